"""danlu serve against hostile and careless clients, on loopback: each request's bad input is that request's
4xx (or a documented repair), never another's error; timed-out and abandoned work stops; the event loop
stays free; the OpenAI surface is strict.
"""
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from danlu.registry import ConfigError
from danlu.serve.app import ServeOptions, create_app
from danlu.serve.batching import MicroBatcher
from danlu.serve.predictor import Predictor
from danlu.serve.server import ServerThread
from danlu.testing import classifier_run, language_model_run

torch.set_num_threads(1)
JSON = {"content-type": "application/json"}
CUT_EMOJI = '"好评\\ud83d"'  # raw JSON: the first half of 😀 (U+1F600) without its second half


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    return classifier_run(str(tmp_path_factory.mktemp("hostile") / "cls"), kind="mlp")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return language_model_run(str(tmp_path_factory.mktemp("hostile") / "lm"), steps=20, chat_tokens=True)


@pytest.fixture(scope="module")
def lm_url(lm_run):
    with ServerThread(create_app(Predictor(lm_run), ServeOptions(max_tokens=24, max_wait_ms=20, max_batch=8))) as url:
        yield url


def error_of(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code, error
    return error


# ---------------------------------------------------------------------------------- isolation


def test_a_cut_emoji_is_repaired_and_fails_no_neighbour(cls_run):
    """A lone surrogate becomes U+FFFD (documented repair); the 15 requests batched with it are unaffected."""
    predictor = Predictor(cls_run)

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            bodies = [f'{{"texts": [{CUT_EMOJI}]}}' if i % 4 == 0 else '{"texts": ["质量很好"]}' for i in range(16)]
            return await asyncio.gather(*(c.post("/v1/predict", content=b, headers=JSON) for b in bodies))

    with ServerThread(create_app(predictor, ServeOptions(max_batch=16, max_wait_ms=50))) as url:
        responses = asyncio.run(main(url))
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    repaired = predictor.classify(["好评\ufffd"])[0]
    assert responses[0].json()["data"][0]["probabilities"] == pytest.approx(repaired["probabilities"], abs=1e-6)


def test_a_cut_emoji_in_chat_and_completions_is_repaired(lm_url, lm_run):
    chat = f'{{"model": "lm", "messages": [{{"role": "user", "content": {CUT_EMOJI}}}], "max_tokens": 4, "temperature": 0}}'
    r = httpx.post(lm_url + "/v1/chat/completions", content=chat, headers=JSON)
    assert r.status_code == 200, r.text
    plain = {"model": "lm", "messages": [{"role": "user", "content": "好评\ufffd"}], "max_tokens": 4, "temperature": 0}
    assert r.json()["choices"] == httpx.post(lm_url + "/v1/chat/completions", json=plain).json()["choices"]
    for prompt in (CUT_EMOJI, f"[{CUT_EMOJI}, \"你好\"]"):
        body = f'{{"model": "lm", "prompt": {prompt}, "max_tokens": 4, "temperature": 0}}'
        assert httpx.post(lm_url + "/v1/completions", content=body, headers=JSON).status_code == 200
    stream = chat.replace('"max_tokens"', '"stream": true, "max_tokens"')
    r = httpx.post(lm_url + "/v1/chat/completions", content=stream, headers=JSON)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") and "error" not in r.text


@pytest.mark.parametrize("case", ["invalid_utf8", "invalid_utf8_in_string", "text_plain", "no_content_type", "empty",
                                  "array", "truncated"])
def test_unreadable_bodies_get_a_clear_4xx(lm_url, case):
    post = lambda content, headers=JSON: httpx.post(lm_url + "/v1/chat/completions", content=content, headers=headers)
    good = json.dumps({"model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    if case == "invalid_utf8":
        assert "not valid UTF-8 (byte 0" in error_of(post(b"\xff\xfe{}"), 400, "invalid_utf8")["message"]
    elif case == "invalid_utf8_in_string":
        body = b'{"model": "lm", "messages": [{"role": "user", "content": "\xe5\xa5"}]}'
        assert "byte 58" in error_of(post(body), 400, "invalid_utf8")["message"]
    elif case == "text_plain":
        error = error_of(post(good, {"content-type": "text/plain"}), 415, "unsupported_media_type")
        assert "application/json" in error["message"] and "text/plain" in error["message"]
    elif case == "no_content_type":
        error_of(httpx.post(lm_url + "/v1/completions", content=good.encode()), 415, "unsupported_media_type")
    elif case == "empty":
        assert "empty" in error_of(post(b""), 400, "invalid_json")["message"]
    elif case == "array":
        assert "JSON object, got a JSON array" in error_of(post(b"[1, 2]"), 400, "invalid_json")["message"]
    elif case == "truncated":
        assert "line 1 column" in error_of(post(good[:-5]), 400, "invalid_json")["message"]


class _Broken:
    """A classifier predictor that fails inside the model on texts containing "boom"."""

    kind, name, task, labels, created, chat_template = "classifier", "broken", "classification", ("a", "b"), 0, None

    def classify(self, texts, top_k=None):
        if any("boom" in t for t in texts):
            raise RuntimeError("boom")
        return [{"label": "a", "score": 0.9, "probabilities": {"a": 0.9, "b": 0.1}} for _ in texts]

    def describe(self):
        return {"id": self.name, "kind": self.kind, "task": self.task, "model": "fake", "labels": list(self.labels)}


def test_a_failing_item_fails_only_its_own_request_and_a_500_closes_the_connection():
    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            texts = ["boom" if i == 3 else "fine" for i in range(12)]
            return await asyncio.gather(*(c.post("/v1/predict", json={"texts": [t]}) for t in texts))

    with ServerThread(create_app(_Broken(), ServeOptions(max_batch=16, max_wait_ms=50))) as url:
        responses = asyncio.run(main(url))
        with httpx.Client(base_url=url, timeout=30) as c:  # one kept-alive connection
            crashed = c.post("/v1/predict", json={"texts": ["boom"]})
            after = c.post("/v1/predict", json={"texts": ["fine"]})
    assert [r.status_code for r in responses] == [500 if i == 3 else 200 for i in range(12)]
    assert error_of(crashed, 500, "internal_error")["type"] == "server_error"
    assert crashed.headers["connection"] == "close"  # said, not silently dropped
    assert after.status_code == 200


def test_the_batcher_reruns_a_failed_batch_item_by_item():
    def fn(payloads):
        if "boom" in payloads:
            raise ValueError("boom")
        return [p.upper() for p in payloads]

    async def main():
        batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=50)
        futures = [batcher.put(p) for p in ("a", "boom", "c", "d")]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return results

    a, boom, c, d = asyncio.run(main())
    assert (a, c, d) == ("A", "C", "D") and isinstance(boom, ValueError)


# ---------------------------------------------------------------------------------- cancellation


class _SlowSteps:
    """Slows each model call of a run to `seconds` and counts the calls."""

    def __init__(self, model, seconds=0.05):
        self.calls, self.seconds = 0, seconds
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        time.sleep(self.seconds)

    def settled(self, wait=0.6):
        """Calls made once a wait shows no new ones (or the count after `wait` if it is still counting)."""
        before = self.calls
        time.sleep(wait)
        return before, self.calls


@pytest.mark.parametrize("how", ["timeout", "disconnect"])
def test_timed_out_or_abandoned_generation_stops_at_the_next_step(tmp_path, how):
    run = language_model_run(str(tmp_path / "lm"), steps=0)
    slow = _SlowSteps(run.model)
    options = ServeOptions(max_tokens=200, timeout_s=0.5 if how == "timeout" else 60, max_batch=1)
    body = {"model": "lm", "prompt": "你好", "max_tokens": 200, "temperature": 0}
    try:
        with ServerThread(create_app(Predictor(run), options)) as url:
            if how == "timeout":
                error = error_of(httpx.post(url + "/v1/completions", json=body), 504, "timeout")
                assert error["type"] == "server_error"
            else:
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(url + "/v1/completions", json=body, timeout=0.5)
            time.sleep(0.3)
            before, after = slow.settled()
            assert after == before and after < 40, (before, after)  # 200 steps would take 10 s
            quick = {**body, "max_tokens": 2}
            assert httpx.post(url + "/v1/completions", json=quick).status_code == 200  # the slot is free
            assert slow.calls - after <= 4  # only its own steps ran: the abandoned generation stays stopped
    finally:
        slow.handle.remove()


def test_chat_without_max_tokens_gets_the_documented_default(lm_run):
    assert ServeOptions().chat_max_tokens == 256
    with ServerThread(create_app(Predictor(lm_run), ServeOptions(max_tokens=100, chat_max_tokens=5))) as url:
        body = {"model": "lm", "messages": [{"role": "user", "content": "你好"}], "temperature": 0}
        usage = httpx.post(url + "/v1/chat/completions", json=body).json()["usage"]
    assert usage["completion_tokens"] <= 5


# ---------------------------------------------------------------------------------- the event loop


LOOPING = ("{% for m in messages %}{% if 'slow' in m['content'] %}{% for i in range(99999) %}{% for j in range(99999) %}"
           "{% endfor %}{% endfor %}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "<|im_start|>assistant\n")


def test_a_looping_template_is_stopped_and_never_blocks_the_server(tmp_path):
    run = language_model_run(str(tmp_path / "lm"), steps=0, chat_template=LOOPING)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "danlu", "serve", run.path, "--port", "0", "--timeout", "30"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "danlu serve exited"
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            url = found.group(1) if found else None
        threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
        for _ in range(200):
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        answers = {}
        body = {"model": "lm", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 2}
        slow = threading.Thread(target=lambda: answers.update(slow=httpx.post(url + "/v1/chat/completions", json=body,
                                                                                 timeout=60)))
        slow.start()
        time.sleep(0.3)  # the template is rendering now
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        good = {"model": "lm", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=good, timeout=5).status_code == 200
        assert slow.is_alive()  # answered while the looping template was still being stopped
        slow.join(30)
        assert "still rendering after 2 s" in error_of(answers["slow"], 400, "chat_template")["message"]
        slow = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", json=body, timeout=60))
        slow.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)  # while a template loops
        assert proc.wait(15) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_huge_message_is_refused_by_its_length_before_any_tokenizer(lm_url):
    body = {"model": "lm", "messages": [{"role": "user", "content": "好" * 300_000}], "max_tokens": 2}
    error = error_of(httpx.post(lm_url + "/v1/chat/completions", json=body), 400, "context_length_exceeded")
    assert "300,000 characters" in error["message"] and error["param"] == "messages"
    error = error_of(httpx.post(lm_url + "/v1/completions", json={"model": "lm", "prompt": "x" * 300_000}), 400,
                     "context_length_exceeded")
    assert error["param"] == "prompt"


# ---------------------------------------------------------------------------------- the OpenAI surface


@pytest.mark.parametrize("field,value", [("max_tokens", "5"), ("stream", "yes"), ("temperature", "0.5"), ("n", 1.0),
                                         ("stop", 3)])
def test_types_are_strict(lm_url, field, value):
    body = {"model": "lm", "messages": [{"role": "user", "content": "hi"}], field: value}
    assert error_of(httpx.post(lm_url + "/v1/chat/completions", json=body), 400, "invalid_value")["param"] == field


@pytest.mark.parametrize("route,field,value", [
    ("chat", "tool_choice", "auto"), ("chat", "response_format", {"type": "json_object"}),
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]), ("chat", "logit_bias", {"5": 10}),
    ("chat", "presence_penalty", 0.5), ("completions", "suffix", "end"), ("completions", "best_of", 3),
    ("completions", "frequency_penalty", 1.0),
])
def test_parameters_that_would_change_the_output_are_refused(lm_url, route, field, value):
    body = {"model": "lm", "max_tokens": 2, field: value}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if route == "chat" else {"prompt": "hi"})
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    error = error_of(httpx.post(lm_url + path, json=body), 400, "unsupported_parameter")
    assert error["param"] == field and field in error["message"]
    neutral = {"tool_choice": "none", "response_format": {"type": "text"}, "frequency_penalty": 0,
               "tools": [], "logit_bias": {}, "presence_penalty": 0, "suffix": "", "best_of": 1}[field]
    assert httpx.post(lm_url + path, json={**body, field: neutral}).status_code == 200


def test_usage_counts_the_prompt_once_whatever_n(lm_url):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}]}),
                       ("/v1/completions", {"prompt": "你好"})):
        one, two = (httpx.post(lm_url + path, json={"model": "lm", "max_tokens": 3, "n": n, **body}).json()["usage"]
                    for n in (1, 2))
        assert two["prompt_tokens"] == one["prompt_tokens"] > 0
        assert two["total_tokens"] == two["prompt_tokens"] + two["completion_tokens"]


def test_special_token_text_in_a_message_is_plain_text(lm_run, lm_url):
    predictor = Predictor(lm_run)
    end = lm_run.tokenizer.token_id("<|im_end|>")
    ids = predictor.chat_ids([{"role": "user", "content": "hi<|im_end|>"}])
    assert ids.count(end) == 1  # the template's own, not the user's
    assert ids == predictor.encode("<|im_start|>user\n") + predictor.encode("hi<|im_end|>", plain=True) + \
        predictor.encode("<|im_end|>\n<|im_start|>assistant\n")
    body = {"model": "lm", "max_tokens": 2, "messages": [{"role": "user", "content": "hi<|im_end|>"}]}
    assert httpx.post(lm_url + "/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"] == len(ids)


def test_overload_and_timeout_errors_are_server_errors():
    from danlu.serve.app import APIError

    assert APIError(503, "x").type == APIError(504, "x").type == "server_error"
    assert APIError(400, "x").type == "invalid_request_error"


@pytest.mark.parametrize("flag,value", [("max_queue", 0), ("max_texts", 0), ("max_batch", 0), ("timeout_s", 0),
                                        ("max_tokens", -1), ("max_body_bytes", 0)])
def test_limits_that_would_refuse_everything_are_refused_at_start(flag, value):
    shown = "--timeout" if flag == "timeout_s" else "--" + flag.replace("_", "-")
    with pytest.raises(ConfigError, match=f"{shown} must be (at least 1|more than 0)"):
        ServeOptions(**{flag: value})


def test_cli_refuses_a_zero_queue_at_start(cls_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "danlu", "serve", cls_run.path, "--port", "0", "--max-queue", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--max-queue must be at least 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr
