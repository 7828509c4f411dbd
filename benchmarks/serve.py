"""Serving throughput and latency: `danlu serve` with and without micro-batching, at 1, 16 and 64 clients.

The server is `python -m danlu serve RUN` in its own process, bound to 127.0.0.1; the clients are kept-alive
HTTP/1.1 connections from one asyncio process (uvloop when installed), each sending its next request as soon
as the last one is answered (a closed loop), for a fixed time after a warm-up. The client is minimal on
purpose (requests encoded once, responses read by Content-Length), since it shares the CPU with the server:
httpx would spend more CPU than the server. Without batching (`--max-batch 1`) every request is one model
call; with it (`--max-batch 32 --max-wait-ms 2`, the defaults) the requests that arrive while the model
computes share the next call. The model is the guide's seed LSTM classifier (embedding 128, LSTM 128, texts
of 30-60 characters) and, for completions, a small GPT; both are trained for a moment only (speed does not
depend on accuracy).

On one machine the clients and the server share the CPU cores, so the absolute figures are lower than
a server alone would reach; the comparison between the two modes is what the table is for.

    python benchmarks/run.py --only serve [--quick] [--device cpu|cuda]
    python benchmarks/serve.py --quick
    python benchmarks/serve.py --serve-only streams      # one part: classifier, completions, streams, hostile
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "serve"
CLIENTS = (1, 16, 64)
KEY = "bench"


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--serve-seconds", type=float, help="measured seconds per row and round (default 4; 1.5 with --quick)")
    group.add_argument("--serve-rounds", type=int, help="alternating rounds (default 3; 2 with --quick)")
    group.add_argument("--serve-no-lm", action="store_true", help="skip the language-model (completions) rows")
    group.add_argument("--serve-hostile", type=int, help="requests of the hostile mix (default 2000; 300 with --quick; "
                                                          "0 skips it)")
    group.add_argument("--serve-only", nargs="+", choices=PARTS, help="run these parts only (default: all): "
                                                                      + ", ".join(PARTS))


PARTS = ("classifier", "completions", "streams", "hostile")
MODES = {"off": ["--max-batch", "1"], "on (32 / 2 ms)": ["--max-batch", "32", "--max-wait-ms", "2"]}


def run(args):
    quick = getattr(args, "quick", False)
    seconds = getattr(args, "serve_seconds", None) or (1.5 if quick else 4.0)
    rounds = getattr(args, "serve_rounds", None) or (2 if quick else 3)
    device = getattr(args, "device", "cpu") or "cpu"
    device = "cuda" if device == "auto" and _cuda() else ("cpu" if device == "auto" else device)
    threads = getattr(args, "threads", 0) or 1  # the server's torch threads; 1 is best on a shared CPU
    parts = set(getattr(args, "serve_only", None) or PARTS)
    if getattr(args, "serve_no_lm", False):
        parts -= {"completions", "streams", "hostile"}
    hostile = getattr(args, "serve_hostile", None)
    if ((300 if quick else 2000) if hostile is None else hostile) == 0:
        parts.discard("hostile")
    rows = []
    with tempfile.TemporaryDirectory(prefix="danlu-bench-serve-") as tmp:
        from danlu.testing import classifier_run, language_model_run

        if "classifier" in parts:
            classifier = classifier_run(os.path.join(tmp, "lstm"), kind="lstm", rows=200, max_length=128,
                                        embed_dim=128, hidden_dim=128)
            rows += _measure(classifier.path, device, seconds, rounds, threads, "lstm classifier", "/v1/predict",
                             [{"texts": text} for text in _texts(200)])
        prompts = ["你好", "今天天气", "丹炉可以", "hello, i am", "the quick"]
        if parts & {"completions", "streams"}:
            lm = language_model_run(os.path.join(tmp, "gpt"), steps=10, embed_dim=128, num_heads=4, num_layers=4)
        if "completions" in parts:
            rows += _measure(lm.path, device, seconds, rounds, threads, "gpt completions, 16 tokens", "/v1/completions",
                             [{"model": "gpt", "prompt": p, "max_tokens": 16, "temperature": 0} for p in prompts])
        if "streams" in parts:
            rows += _streams(lm.path, device, seconds, rounds, threads, prompts)
        if "hostile" in parts:
            rows.append(_hostile(os.path.join(tmp, "gpt-hostile"), device, threads,
                                 (300 if quick else 2000) if hostile is None else hostile))
    return rows


def _streams(run_dir, device, seconds, rounds, threads, prompts, clients=16, share=0.1):
    """16 closed-loop clients, 10% of whose requests are streamed chats (16 tokens) and the rest 16-token
    completions, against the same clients sending streams only: the streams' p50 (whole stream) in the mix
    over their p50 alone (`vs_alone`: the same 16 clients streaming only; `vs_one`: one client streaming on an
    idle server). With continuous batching both kinds share every decoding step, and the streamed rows take two
    steps of their own after each (`--stream-steps 3`, the default); the same mix on a second server with
    `--stream-steps 1` (streams wait for the batch like the others) is the A/B of that priority. The loads
    alternate within each round, so that load from elsewhere on the machine falls on all of them."""
    stream = [{"model": "gpt", "messages": [{"role": "user", "content": p}], "max_tokens": 16, "temperature": 0,
               "stream": True} for p in prompts]
    plain = [{"model": "gpt", "prompt": p, "max_tokens": 16, "temperature": 0} for p in prompts]
    mix = f"{share:.0%} streams"
    runs = {mix: (clients, share), f"{mix}, --stream-steps 1": (clients, share), "streams only": (clients, 1.0),
            "one stream alone": (1, 1.0)}
    results = {name: [] for name in runs}
    servers = [_Server(run_dir, device, "--threads", str(threads), "--max-batch", "32", *flags)
               for flags in ((), ("--stream-steps", "1"))]
    urls = []
    try:
        for server in servers:
            urls.append(server.__enter__())
        for _ in range(rounds):
            for name, (n, part) in runs.items():
                url = urls[1] if "--stream-steps 1" in name else urls[0]
                results[name].append(_run_loop(_mixed(url, stream, plain, n, seconds, part)))
    finally:
        for server in servers[: len(urls)]:
            server.__exit__()
    alone = statistics.median(r["stream_p50"] for r in results["streams only"])
    one = statistics.median(r["stream_p50"] for r in results["one stream alone"])
    rows = []
    for name, rs in results.items():
        p50 = statistics.median(r["stream_p50"] for r in rs)
        n, part = runs[name]
        rows.append({"model": f"gpt 16-token chats, {name}", "batching": "continuous", "clients": n,
                     "requests": sum(r["ok"] for r in rs), "errors": sum(r["errors"] for r in rs),
                     "throughput_rps": round(statistics.median(r["throughput"] for r in rs), 1),
                     "stream_p50_ms": round(p50, 1), "stream_p50_vs_alone": round(p50 / alone, 2),
                     "stream_p50_vs_one": round(p50 / one, 2),
                     "completion_p50_ms": round(statistics.median(r["plain_p50"] for r in rs), 1)
                     if part < 1 else None})
    return rows


async def _mixed(url, stream_bodies, plain_bodies, clients, seconds, share, warmup=0.5):
    """Closed-loop load where a `share` of the requests are streamed chats (`stream_bodies`) and the rest
    completions (`plain_bodies`)."""
    streams = [_request(url, "/v1/chat/completions", b) for b in stream_bodies]
    plain = [_request(url, "/v1/completions", b) for b in plain_bodies]

    async def send(reader, writer, rng):
        if rng.random() < share:
            return "stream", await _post_stream(reader, writer, rng.choice(streams))
        return "plain", await _post(reader, writer, rng.choice(plain))

    latencies, errors = await _closed_loop(url, send, clients, seconds, warmup, seed=1)
    median = lambda xs: statistics.median(xs) * 1000 if xs else float("nan")  # noqa: E731
    ok = len(latencies["stream"]) + len(latencies["plain"])
    return {"ok": ok, "errors": errors, "throughput": ok / seconds, "stream_p50": median(latencies["stream"]),
            "plain_p50": median(latencies["plain"])}


async def _post_stream(reader, writer, request):
    """Send one streamed request; read its chunked server-sent events to the end -> the status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        await reader.readexactly(length)
        return status
    body = await reader.readuntil(b"\r\n0\r\n\r\n")  # the last chunk of a chunked body
    return status if b"data: [DONE]" in body and b'"error"' not in body else -1


def _hostile(run_dir, device, threads, n):
    """Good requests among hostile ones (danlu.testing.hostile_requests: cut emoji, invalid UTF-8, huge bodies and
    messages, wrong types, unsupported parameters, a looping template, early disconnects), 32 httpx clients: how
    many good ones failed, how many answers were 5xx, how the server's memory moved."""
    from danlu.testing import SLOW_TEMPLATE, hostile_requests, language_model_run, send_all

    language_model_run(run_dir, steps=10, chat_template=SLOW_TEMPLATE)
    requests = hostile_requests(n, model="gpt-hostile", seed=1, slow_every=max(80, n // 8))
    warm = len(requests) // 5
    server = _Server(run_dir, device, "--threads", str(threads), "--max-tokens", "64", "--max-body-bytes", "65536")
    url = server.__enter__()
    try:
        asyncio.run(send_all(url, requests[:warm], api_key=KEY))
        before = _rss_mb(server.proc.pid)
        started = time.perf_counter()
        outcomes = asyncio.run(send_all(url, requests[warm:], api_key=KEY))
        seconds = time.perf_counter() - started
        after = _rss_mb(server.proc.pid)
    finally:
        server.__exit__()
    measured = requests[warm:]
    good = [got for r, got in zip(measured, outcomes) if r["expect"] == 200]
    hostile = [(r["expect"], got) for r, got in zip(measured, outcomes) if r["expect"] not in (None, 200)]
    return {"model": "gpt, hostile mix", "batching": "on (32 / 2 ms)", "clients": 32, "requests": len(measured),
            "good": len(good), "good_failed": sum(got != 200 for got in good),
            "hostile_wrong_status": sum(want != got for want, got in hostile),
            "server_errors": sum(1 for got in outcomes if got is not None and got >= 500),
            "seconds": round(seconds, 1), "rss_before_mb": round(before), "rss_after_mb": round(after)}


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def _measure(run_dir, device, seconds, rounds, threads, model, route, bodies, clients=CLIENTS):
    """Both servers run side by side; the modes alternate within each round, so that load from elsewhere
    on the machine falls on both; each figure is the median over rounds."""
    results = {(mode, n): [] for mode in MODES for n in clients}
    servers = {mode: _Server(run_dir, device, "--threads", str(threads), *flags) for mode, flags in MODES.items()}
    urls = {mode: server.__enter__() for mode, server in servers.items()}
    try:
        for _ in range(rounds):
            for n in clients:
                for mode in MODES:
                    results[mode, n].append(_run_loop(_load(urls[mode], route, bodies, n, seconds)))
    finally:
        for server in servers.values():
            server.__exit__()
    rows = []
    for mode in MODES:
        for n in clients:
            rs = results[mode, n]
            throughput = statistics.median(r["throughput"] for r in rs)
            off = statistics.median(r["throughput"] for r in results["off", n])
            rows.append({
                "model": model, "batching": mode, "clients": n, "requests": sum(r["ok"] for r in rs),
                "errors": sum(r["errors"] for r in rs), "throughput_rps": round(throughput, 1),
                "p50_ms": round(statistics.median(r["p50"] for r in rs), 2),
                "p99_ms": round(statistics.median(r["p99"] for r in rs), 2),
                "vs_off": round(throughput / off, 2) if off else None,
            })
    return rows


async def _load(url, route, bodies, clients, seconds, warmup=0.5):
    """Closed-loop load of one route: each request one of `bodies`, at random."""
    requests = [_request(url, route, body) for body in bodies]

    async def send(reader, writer, rng):
        return "plain", await _post(reader, writer, rng.choice(requests))

    latencies, errors = await _closed_loop(url, send, clients, seconds, warmup, seed=0)
    latencies = sorted(latencies["plain"])
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
    return {"ok": len(latencies), "errors": errors, "throughput": len(latencies) / seconds,
            "p50": statistics.median(latencies) * 1000 if latencies else float("nan"), "p99": pick(0.99)}


async def _closed_loop(url, send, clients, seconds, warmup, seed):
    """`clients` keep-alive connections, each sending its next request once the last is answered, for `seconds`
    after `warmup` seconds: `await send(reader, writer, rng)` sends one -> (its kind, the status code).
    -> ({kind: [seconds each answered request took]} over the measured time, how many were not answered 200)."""
    host, port = url.split("//", 1)[1].split(":")
    rng = random.Random(seed)
    latencies, errors = {"stream": [], "plain": []}, 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def worker():
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                kind, status = await send(reader, writer, rng)
                if sent >= measure_from:
                    if status == 200:
                        latencies[kind].append(time.perf_counter() - sent)
                    else:
                        errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, errors


def _request(url, route, body):
    """The bytes of one HTTP/1.1 POST of `body` as JSON to the server at `url`."""
    host = url.split("//", 1)[1].split(":")[0]
    payload = json.dumps(body).encode()
    return (f"POST {route} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload


async def _post(reader, writer, request):
    """Send one request on a kept-alive connection -> the status code. A minimal client on purpose: httpx costs
    several milliseconds of CPU a request at 64 connections, and the client shares the cores with the server."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    await reader.readexactly(length)
    return status


class _Server:
    """`danlu serve` in a subprocess; `with _Server(...) as url:`."""

    def __init__(self, run_dir, device, *flags):
        self.command = [sys.executable, "-m", "danlu", "serve", run_dir, "--port", "0", "--api-key", KEY,
                        "--device", device, "--no-access-log", *flags]

    def __enter__(self):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="danlu-serve-", suffix=".log")
        self.proc = subprocess.Popen(self.command, stderr=self.log, stdout=subprocess.DEVNULL)
        self.url = wait_for_url(self.proc, self.log.name)
        return self.url

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def wait_for_url(proc, log_path, timeout=180):
    """The URL `danlu serve` announces on stderr (logged to a file: a pipe nobody reads would fill up and
    block the server), once /health answers."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log_path, encoding="utf-8") as f:
            log = f.read()
        if proc.poll() is not None:
            raise RuntimeError("danlu serve exited: " + log[-2000:])
        found = re.search(r"on (http://127\.0\.0\.1:\d+)/", log)
        if found:
            try:
                httpx.get(found.group(1) + "/health")
                return found.group(1)
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    raise TimeoutError("danlu serve did not start")


def _texts(n, seed=0):
    from danlu.testing import FILLER, NEGATIVE, POSITIVE

    rng = random.Random(seed)
    words = FILLER + POSITIVE + NEGATIVE + ["，", "。", "的", "了", "很", "也"]
    return ["".join(rng.choices(words, k=rng.randint(12, 24))) for _ in range(n)]


def _run_loop(coroutine):
    """asyncio.run, on uvloop when installed (it comes with uvicorn[standard]): less client CPU a request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _cuda():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
