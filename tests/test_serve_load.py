"""A bounded load test on loopback: `danlu serve` in a subprocess, 2,000 mixed requests from 32 concurrent
httpx clients. Every request is answered, none with a 5xx, the server counted each one, and its memory stays
flat. A second, smaller run mixes streamed and batched completions on a language model, and a third mixes
good requests with hostile ones (danlu.testing.hostile_requests).
"""
import asyncio
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from danlu.testing import HOSTILE, SLOW_TEMPLATE, classifier_run, hostile_requests, language_model_run, send_all

torch.set_num_threads(1)
KEY = "load-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    """`python -m danlu serve RUN --port 0` in a subprocess; the URL comes from its first line."""

    def __init__(self, run_dir, *args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "danlu", "serve", run_dir, "--port", "0", "--api-key", KEY,
                                      *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.url = None
        deadline = time.time() + 120
        while self.url is None and time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("danlu serve exited")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            self.url = found.group(1) if found else None
        for _ in range(300):
            try:
                httpx.get(self.url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.05)

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)


async def hammer(url, requests, concurrency=32):
    """Send (method, path, json, headers, expected) requests with `concurrency` workers; returns statuses."""
    queue = asyncio.Queue()
    for i, r in enumerate(requests):
        queue.put_nowait((i, r))
    statuses = [None] * len(requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            while not queue.empty():
                i, (method, path, body, headers, stream) = queue.get_nowait()
                if stream:
                    async with client.stream(method, path, json=body, headers=headers) as response:
                        text = "".join([line async for line in response.aiter_lines()])
                        statuses[i] = response.status_code if text.endswith("data: [DONE]") else -1
                else:
                    response = await client.request(method, path, json=body, headers=headers)
                    statuses[i] = response.status_code

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def classifier_requests(n, seed=0):
    rng = random.Random(seed)
    words = ["质量很好", "物流太慢", "推荐", "失望", "good", "bad", "价格不错", "退货"]
    kinds = ["one"] * 55 + ["many"] * 20 + ["models"] * 8 + ["health"] * 5 + ["bad"] * 7 + ["nokey"] * 5
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind == "one":
            out.append(("POST", "/v1/predict", {"texts": rng.choice(words) * rng.randint(1, 3)}, AUTH, False, 200))
        elif kind == "many":
            out.append(("POST", "/v1/predict", {"texts": rng.choices(words, k=rng.randint(2, 8))}, AUTH, False, 200))
        elif kind == "models":
            out.append(("GET", "/v1/models", None, AUTH, False, 200))
        elif kind == "health":
            out.append(("GET", "/health", None, {}, False, 200))
        elif kind == "bad":
            out.append(("POST", "/v1/predict", {"texts": [1, 2]}, AUTH, False, 400))
        else:
            out.append(("POST", "/v1/predict", {"texts": ["x"]}, {}, False, 401))
    return out


def test_two_thousand_mixed_requests(tmp_path):
    run = classifier_run(str(tmp_path / "cls"), kind="mlp")
    server = Server(run.path, "--max-queue", "512")
    try:
        requests = classifier_requests(2000)
        warm = asyncio.run(hammer(server.url, [r[:5] for r in requests[:400]]))
        before = server.rss_mb()
        rest = asyncio.run(hammer(server.url, [r[:5] for r in requests[400:]]))
        after = server.rss_mb()
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    statuses = warm + rest
    assert None not in statuses and len(statuses) == 2000  # no lost request
    assert statuses == [r[5] for r in requests]  # each answered as expected: no 5xx, no 503
    counted = sum(int(n) for n in re.findall(r"^danlu_requests_total\{[^}]*\} (\d+)$", metrics, re.MULTILINE))
    assert counted == 2000 + 1  # the server saw every request exactly once (+ the readiness probe)
    assert after - before < 25, f"server memory grew from {before:.0f} MB to {after:.0f} MB over 1,600 requests"


def test_language_model_under_concurrent_streams_and_batches(tmp_path):
    run = language_model_run(str(tmp_path / "lm"), steps=20)
    server = Server(run.path, "--max-tokens", "6", "--max-batch", "16", "--max-wait-ms", "5")
    rng = random.Random(1)
    chat = {"model": "lm", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 6}
    requests = []
    for i in range(240):
        kind = i % 4
        if kind == 0:
            requests.append(("POST", "/v1/completions", {"model": "lm", "prompt": rng.choice(["你好", "今天", "丹炉"]),
                                                          "max_tokens": 6, "temperature": 0}, AUTH, False))
        elif kind == 1:
            requests.append(("POST", "/v1/chat/completions", {**chat, "temperature": 0.8, "seed": i}, AUTH, False))
        elif kind == 2:
            requests.append(("POST", "/v1/chat/completions", {**chat, "stream": True}, AUTH, True))
        else:
            requests.append(("POST", "/v1/completions", {"model": "lm", "prompt": "x", "max_tokens": 99}, AUTH, False))
    try:
        statuses = asyncio.run(hammer(server.url, requests))
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    assert statuses == [400 if i % 4 == 3 else 200 for i in range(240)]
    assert "danlu_streams_active 0" in metrics  # every stream released its slot
    steps = int(re.search(r'danlu_batch_size_count\{batcher="generate"\} (\d+)', metrics).group(1))
    rows = float(re.search(r'danlu_batch_size_sum\{batcher="generate"\} ([0-9.e+]+)', metrics).group(1))
    assert rows / steps > 1.3  # decoding steps ran several requests at once: streams and completions shared the batch


def test_good_requests_never_fail_among_hostile_ones(tmp_path):
    """Cut emoji, invalid UTF-8, huge bodies and messages, wrong types, unsupported parameters, a template that
    loops, clients that leave early: each hostile request gets its own 4xx, every good one its 200, no 5xx."""
    run = language_model_run(str(tmp_path / "lm"), steps=20, chat_template=SLOW_TEMPLATE)
    server = Server(run.path, "--max-tokens", "64", "--max-batch", "16", "--max-body-bytes", "65536")
    requests = hostile_requests(320, seed=3, slow_every=160)
    try:
        warm = asyncio.run(send_all(server.url, requests[:120], api_key=KEY))
        before = server.rss_mb()
        rest = asyncio.run(send_all(server.url, requests[120:], api_key=KEY))
        after = server.rss_mb()
        metrics = httpx.get(server.url + "/metrics").text
        health = httpx.get(server.url + "/health").json()
    finally:
        server.stop()
    outcomes = warm + rest
    assert {r["kind"] for r in requests} >= set(HOSTILE) | {"chat", "stream", "cut_emoji_chat", "disconnect"}
    wrong = [(r["kind"], got) for r, got in zip(requests, outcomes) if r["expect"] is not None and got != r["expect"]]
    assert not wrong, wrong[:20]
    assert not re.search(r'danlu_requests_total\{[^}]*status="5\d\d"[^}]*\} [1-9]', metrics), "a 5xx was answered"
    assert "danlu_streams_active 0" in metrics and health["queue_depth"] == 0
    assert after - before < 25, f"server memory grew from {before:.0f} MB to {after:.0f} MB"
