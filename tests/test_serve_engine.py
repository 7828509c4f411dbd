"""Continuous batching (danlu.serve.engine): requests join and leave one decoding batch step by step, and
each decodes exactly as it would alone; over HTTP, a short request is not stuck behind a long one and a
stream gets its tokens at the batch's pace.
"""
import random
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from danlu.generation import generate
from danlu.serve.app import ServeOptions, create_app
from danlu.serve.engine import Engine, Request
from danlu.serve.predictor import Predictor
from danlu.serve.server import ServerThread
from danlu.testing import CORPUS, language_model_run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return language_model_run(str(tmp_path_factory.mktemp("engine") / "lm"), steps=40)


def collect(engine, ids, sampling, stream=False):
    """Submit one request; returns (its Request, a dict that gets `deltas` and `result`, an Event set at the end)."""
    out, finished = {"deltas": []}, threading.Event()

    def emit(kind, value):
        if kind == "delta":
            out["deltas"].append(value)
        else:
            out[kind] = value
            finished.set()

    request = Request(list(ids), sampling, emit, stream=stream)
    engine.submit(request)
    return request, out, finished


def test_requests_joining_and_leaving_decode_exactly_as_alone(lm_run):
    """Staggered requests with prompts of 1 to 60 characters and 3 to 90 new tokens keep the batch busy past
    the cache's width, so rows move right (long prompts), left (the width runs out) and fill gaps (leaving)."""
    predictor = Predictor(lm_run)
    engine = Engine(lm_run.model, lm_run.tokenizer, max_batch=6, max_queue=64, paused=True)
    rng = random.Random(0)
    text = "".join(CORPUS)
    jobs = []
    for i in range(40):
        start = rng.randrange(len(text) - 60)
        # the first two arrive together: a 1-token row, then a 60-token prompt that has to move it right
        prompt = text[start : start + ({0: 1, 1: 60}.get(i) or rng.randint(1, 60))]
        sampling = {"max_new_tokens": rng.randint(3, 90), "temperature": 0, "stop": ("。",) if i % 5 == 0 else ()}
        jobs.append((prompt, sampling, collect(engine, predictor.encode(prompt), sampling, stream=i % 3 == 0)))
        if i == 1:
            engine.resume()
        time.sleep(rng.random() * 0.01 if i else 0)
    for prompt, sampling, (_, out, finished) in jobs:
        assert finished.wait(60), prompt
        want = generate(lm_run.model, lm_run.tokenizer, [prompt], **sampling)[0]
        text_out, used, finish, _ = out["done"]
        assert text_out == want, (prompt, sampling)
        if out["deltas"]:
            assert "".join(out["deltas"]) == want
        assert finish == ("length" if used == sampling["max_new_tokens"] and not sampling["stop"] else finish)
    engine.close()


def test_cancelled_rows_leave_and_seeded_rows_do_not_depend_on_neighbours(lm_run):
    predictor = Predictor(lm_run)
    engine = Engine(lm_run.model, lm_run.tokenizer, max_batch=8)
    seeded = {"max_new_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    _, alone, done = collect(engine, predictor.encode("今天"), seeded)
    assert done.wait(30)
    long = collect(engine, predictor.encode("你好"), {"max_new_tokens": 200, "temperature": 1.0})
    others = [collect(engine, predictor.encode("丹炉"), {"max_new_tokens": 30, "temperature": 0.7}) for _ in range(3)]
    _, crowded, done = collect(engine, predictor.encode("今天"), seeded)
    assert done.wait(30) and crowded["done"] == alone["done"]
    long[0].cancelled.set()
    for _, _, finished in others:
        assert finished.wait(30)
    time.sleep(0.2)
    assert engine.active == 0 and "done" not in long[1]  # the cancelled row left without an answer
    engine.close()


class _SlowSteps:
    def __init__(self, model, seconds):
        self.seconds, self.calls = seconds, 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        time.sleep(self.seconds)


def test_a_short_request_is_not_stuck_behind_a_long_one_and_streams_keep_the_batch_pace(tmp_path):
    run = language_model_run(str(tmp_path / "lm"), steps=0)
    slow = _SlowSteps(run.model, 0.02)  # every model call (a decoding step of the whole batch) takes 20 ms
    options = ServeOptions(max_tokens=200, timeout_s=60)
    try:
        with ServerThread(create_app(Predictor(run), options)) as url:
            long = {"model": "lm", "prompt": "你好", "max_tokens": 200, "temperature": 0}
            box = {}
            worker = threading.Thread(target=lambda: box.update(r=httpx.post(url + "/v1/completions", json=long,
                                                                             timeout=60)))
            worker.start()
            while slow.calls < 10:  # the long request is decoding (200 steps: 4 s)
                time.sleep(0.01)
            before = slow.calls
            short = httpx.post(url + "/v1/completions", json={**long, "max_tokens": 2}, timeout=60)
            short_steps = slow.calls - before
            before = slow.calls
            body = {"model": "lm", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 10,
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
            stream_steps = slow.calls - before
            long_running = worker.is_alive()
            worker.join(60)
    finally:
        slow.handle.remove()
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 2
    assert long_running  # both finished while the long one was still decoding
    # steps counted while each ran (the long one keeps decoding meanwhile); behind it, ~180 would pass
    assert short_steps < 60, short_steps
    assert len(chunks) >= 3 and stream_steps < 80, stream_steps
    assert box["r"].status_code == 200 and box["r"].json()["usage"]["completion_tokens"] == 200


def test_a_prompt_the_model_cannot_read_fails_only_its_own_request(lm_run):
    predictor = Predictor(lm_run)
    engine = Engine(lm_run.model, lm_run.tokenizer, max_batch=4, paused=True)
    greedy = {"max_new_tokens": 8, "temperature": 0}
    good = [collect(engine, predictor.encode(p), greedy) for p in ("你好", "丹炉")]
    bad = collect(engine, [10 ** 6], greedy)  # no such token: the embedding lookup fails
    engine.resume()
    assert bad[2].wait(30) and isinstance(bad[1]["error"], IndexError)
    for (_, out, finished), prompt in zip(good, ("你好", "丹炉")):
        assert finished.wait(30)
        assert out["done"][0] == generate(lm_run.model, lm_run.tokenizer, [prompt], **greedy)[0]
    engine.close()


class _Calls:
    """Records every model call: (rows, tokens per row, the columns its cache reads)."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids, cache = args[0], kwargs.get("cache")
        self.calls.append((ids.shape[0], ids.shape[1], None if cache is None else cache.length + ids.shape[1]))

    def prefills(self):
        return [(rows, tokens) for rows, tokens, _ in self.calls if tokens > 1]


def resume_and_record(engine, jobs, model):
    """Start a paused engine and wait for its `jobs` (from collect) -> the _Calls of the model meanwhile."""
    calls = _Calls(model)
    try:
        engine.resume()
        for _, _, finished in jobs:
            assert finished.wait(30)
    finally:
        calls.handle.remove()
        engine.close()
    return calls


def test_prompts_joining_at_one_step_are_prefilled_together_and_decode_as_alone(lm_run):
    """Prompts of 1 to 40 characters that arrive together are one left-padded prefill call; greedy rows still
    give generate()'s text alone, and a seeded row the same text as when it ran alone."""
    predictor = Predictor(lm_run)
    text = "".join(CORPUS)
    prompts = [text[:1], text[3:40], text[50:55], text[60:61], text[70:95], text[100:112]]
    greedy = {"max_new_tokens": 12, "temperature": 0}
    seeded = {"max_new_tokens": 12, "temperature": 0.9, "top_k": 20, "seed": 5}
    alone = Engine(lm_run.model, lm_run.tokenizer, max_batch=8)
    _, want_seeded, done = collect(alone, predictor.encode(prompts[2]), seeded)
    assert done.wait(30)
    alone.close()
    engine = Engine(lm_run.model, lm_run.tokenizer, max_batch=8, paused=True)
    jobs = [collect(engine, predictor.encode(p), seeded if i == 2 else greedy, stream=i % 2 == 0)
            for i, p in enumerate(prompts)]
    calls = resume_and_record(engine, jobs, lm_run.model)
    widths = [len(predictor.encode(p)) for p in prompts]
    assert calls.prefills() == [(len(prompts), max(widths))]  # one call for all six
    for i, (prompt, (_, out, _)) in enumerate(zip(prompts, jobs)):
        if i == 2:
            assert out["done"] == want_seeded["done"]
            continue
        want = generate(lm_run.model, lm_run.tokenizer, [prompt], **greedy)[0]
        assert out["done"][0] == want, prompt
        if out["deltas"]:
            assert "".join(out["deltas"]) == want


def test_the_prefill_budget_bounds_the_prompt_tokens_between_two_steps(lm_run):
    predictor = Predictor(lm_run)
    text = "".join(CORPUS)
    prompts = [text[i * 7 : i * 7 + 6] for i in range(5)] + [text[:30]]  # five of 6 characters, one of 30
    greedy = {"max_new_tokens": 6, "temperature": 0}
    short, long = len(predictor.encode(prompts[0])), len(predictor.encode(prompts[-1]))
    engine = Engine(lm_run.model, lm_run.tokenizer, max_batch=8, paused=True, prefill_tokens=2 * short)
    jobs = [collect(engine, predictor.encode(p), greedy) for p in prompts]
    calls = resume_and_record(engine, jobs, lm_run.model)
    # two prompts of 6 per step, then the long one alone (a prompt longer than the budget still joins)
    assert calls.prefills() == [(2, short), (2, short), (1, short), (1, long)]
    for prompt, (_, out, _) in zip(prompts, jobs):
        assert out["done"][0] == generate(lm_run.model, lm_run.tokenizer, [prompt], **greedy)[0]


def test_a_step_reads_only_the_columns_of_the_rows_in_the_batch(tmp_path):
    """Once a long row leaves, the rows left behind attend over their own columns only, not over the padding
    the long one kept in front of them."""
    run = language_model_run(str(tmp_path / "lm"), steps=0)  # untrained: greedy text runs to max_tokens
    predictor = Predictor(run)
    engine = Engine(run.model, run.tokenizer, max_batch=4)
    calls = _Calls(run.model)

    def wait_for(condition):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    try:
        long = collect(engine, predictor.encode("".join(CORPUS)[:50]), {"max_new_tokens": 150, "temperature": 0})
        wait_for(lambda: len(calls.calls) >= 40)  # the long row is 40 steps in: it spans ~90 columns
        short_prompt = predictor.encode("你好")
        short = collect(engine, short_prompt, {"max_new_tokens": 60, "temperature": 0})
        wait_for(lambda: sum(1 for rows, _, _ in calls.calls if rows == 2) >= 5)  # both rows decode together
        long[0].cancelled.set()
        assert short[2].wait(30) and short[1]["done"][1] == 60
    finally:
        calls.handle.remove()
        engine.close()
    together = [columns for rows, _, columns in calls.calls if rows == 2]
    last = max(i for i, (rows, _, _) in enumerate(calls.calls) if rows == 2)
    after = [columns for _, _, columns in calls.calls[last + 1 :]]
    assert min(together) > 90
    assert after and max(after) <= len(short_prompt) + 60, after


def test_a_steps_events_reach_the_event_loop_in_one_call(lm_run):
    """Four streams decoding together: each step wakes the server's event loop once, not once per row, and
    every stream still gets its events in order."""
    import asyncio

    from danlu.serve.app import _Outbox, _queue_emitter

    predictor = Predictor(lm_run)
    loop = asyncio.new_event_loop()
    wakeups, steps, finished = [], [], threading.Semaphore(0)
    wake = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *args: (wakeups.append(args), wake(*args))[1]
    outbox = _Outbox()
    engine = Engine(lm_run.model, lm_run.tokenizer, max_batch=4, paused=True, on_step=steps.append,
                    flush=outbox.flush)
    greedy = {"max_new_tokens": 8, "temperature": 0}
    prompts, queues = ["你好", "丹炉", "今天", "我是"], [asyncio.Queue() for _ in range(4)]
    for prompt, events in zip(prompts, queues):
        emit = _queue_emitter(outbox, loop, events)
        engine.submit(Request(predictor.encode(prompt), dict(greedy), stream=True,
                              emit=lambda kind, value, emit=emit: (emit(kind, value), kind == "done" and finished.release())))
    try:
        engine.resume()
        for _ in prompts:
            assert finished.acquire(timeout=30)
        time.sleep(0.2)  # the last flush
        loop.run_until_complete(asyncio.sleep(0))  # the calls handed over run
    finally:
        engine.close()
        loop.close()
    assert 0 < len(wakeups) <= len(steps) + 1  # the joint prefill's first tokens, then one per step
    for prompt, events in zip(prompts, queues):
        got = [events.get_nowait() for _ in range(events.qsize())]
        assert got[-1][0] == "done"
        assert "".join(v for k, v in got if k == "delta") == got[-1][1][0]
        assert got[-1][1][0] == generate(lm_run.model, lm_run.tokenizer, [prompt], **greedy)[0]


def test_streamed_rows_take_steps_of_their_own_and_every_row_still_decodes_as_alone(tmp_path):
    """One greedy stream among five completions (a seeded one, one with log probabilities): the stream steps
    twice for each step of the batch, so it finishes in about half the batch's steps; the completions, whose
    columns of the stream's own steps are masked out, give the same text (and log probabilities) as alone."""
    lm_run = language_model_run(str(tmp_path / "lm"), steps=0)  # untrained: every row runs to max_new_tokens
    predictor = Predictor(lm_run)
    text = "".join(CORPUS)
    prompts = [text[:3], text[10:30], text[40:44], text[50:51], text[60:75], text[80:90]]
    greedy = {"max_new_tokens": 24, "temperature": 0}
    seeded = {"max_new_tokens": 24, "temperature": 0.9, "top_k": 20, "seed": 3}
    scored = {**greedy, "logprobs": 2}
    settings = [greedy, greedy, seeded, greedy, scored, greedy]  # row 0 streams

    def run(stream_steps):
        engine = Engine(lm_run.model, lm_run.tokenizer, max_batch=8, paused=True, stream_steps=stream_steps)
        jobs = [collect(engine, predictor.encode(p), s, stream=i == 0) for i, (p, s) in enumerate(zip(prompts, settings))]
        calls = resume_and_record(engine, jobs, lm_run.model)
        return [out["done"] for _, out, _ in jobs], [rows for rows, tokens, _ in calls.calls if tokens == 1], jobs[0][1]

    plain, plain_steps, _ = run(1)
    first, steps, stream = run(2)
    assert plain_steps == [6] * 23  # one prefill, then 23 steps of all six rows
    # the stream's 23 steps: 11 pairs and one more step of the batch, after which it leaves; the rest go on
    assert steps == [6, 1] * 11 + [6] + [5] * 11
    assert [done[:3] for done in first] == [done[:3] for done in plain]  # text, tokens, finish reason
    # log probabilities: the same tokens, the same values up to float rounding (a sum over more, masked, columns)
    for got, want in zip(first[4][3], plain[4][3]):
        assert (got.token, got.offset, [t for t, _, _ in got.top]) == (want.token, want.offset, [t for t, _, _ in want.top])
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
    for i, (prompt, done) in enumerate(zip(prompts, first)):
        if settings[i] is not seeded:
            assert done[0] == generate(lm_run.model, lm_run.tokenizer, [prompt], **greedy)[0], prompt
    assert "".join(stream["deltas"]) == first[0][0]
    alone = Engine(lm_run.model, lm_run.tokenizer, max_batch=8)
    _, want_seeded, done = collect(alone, predictor.encode(prompts[2]), seeded)
    assert done.wait(30)
    alone.close()
    assert first[2] == want_seeded["done"]
