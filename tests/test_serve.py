"""danlu serve: the app over real uvicorn servers on loopback, driven by httpx and the official openai client.

One classifier run and one language-model run (tiny, built in seconds) are served for the whole module,
both with an API key. Servers run in threads (ServerThread) except the CLI test, which starts
`python -m danlu serve` in a subprocess.
"""
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from danlu.chat_template import DEFAULT_TEMPLATE, TemplateError, render_chat
from danlu.serve.app import ServeOptions, create_app
from danlu.serve.batching import MicroBatcher, Overloaded
from danlu.serve.metrics import Metrics
from danlu.registry import ConfigError
from danlu.serve.predictor import Predictor
from danlu.serve.server import ServerThread
from danlu.testing import classifier_run, language_model_run

torch.set_num_threads(1)
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    return classifier_run(str(tmp_path_factory.mktemp("serve") / "cls"), kind="mlp")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return language_model_run(str(tmp_path_factory.mktemp("serve") / "lm"))


@pytest.fixture(scope="module")
def cls_url(cls_run):
    with ServerThread(create_app(Predictor(cls_run), ServeOptions(api_key=KEY, max_texts=8, max_body_bytes=4096))) as url:
        yield url


@pytest.fixture(scope="module")
def lm_url(lm_run):
    options = ServeOptions(api_key=KEY, max_tokens=24, max_wait_ms=20, max_batch=8)
    with ServerThread(create_app(Predictor(lm_run), options)) as url:
        yield url


def assert_error(response, status, code=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in response.text and 'File "' not in response.text
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


# ---------------------------------------------------------------------------------- chat template


def test_default_template_is_chatml():
    messages = [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好"}]
    assert render_chat(DEFAULT_TEMPLATE, messages) == (
        "<|im_start|>system\n简短回答<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(DEFAULT_TEMPLATE, messages, add_generation_prompt=False).endswith("你好<|im_end|>\n")


def test_template_runs_in_the_sandbox():
    with pytest.raises(TemplateError, match="unsafe|not safely|access"):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(TemplateError):
        render_chat("{% for %}", [])


def test_run_template_file_is_used(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    run = language_model_run(str(tmp_path / "lm"), steps=0, chat_template=template)
    predictor = Predictor(run)
    assert predictor.chat_prompt([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    assert predictor.chat_stop == ()  # no ChatML end marker in this template


# ---------------------------------------------------------------------------------- units


def test_micro_batcher_batches_in_order_and_refuses_when_full():
    seen = []

    def fn(payloads):
        seen.append(sum(len(p) for p in payloads))
        time.sleep(0.01)
        return [[t.upper() for t in p] for p in payloads]

    def put_all(batcher, payloads):
        futures = []
        for p in payloads:
            try:
                futures.append(batcher.put(p))
            except Overloaded as e:
                futures.append(e)
        return futures

    async def main():
        batcher = MicroBatcher(fn, max_batch=4, max_wait_ms=50, max_queue=64, size=len)
        results = await asyncio.gather(*put_all(batcher, [[f"t{i}"] for i in range(10)] + [["a", "b"]]))
        loop = asyncio.get_running_loop()
        thread = await loop.run_in_executor(batcher, lambda: threading.current_thread().name)  # a plain call
        small = MicroBatcher(fn, max_batch=1, max_wait_ms=0, max_queue=1, size=len)
        outcomes = put_all(small, [["x"]] * 5)
        outcomes = [await o if isinstance(o, asyncio.Future) else o for o in outcomes]
        await batcher.close()
        await small.close()
        return results, thread, outcomes

    results, thread, outcomes = asyncio.run(main())
    assert results[:10] == [[f"T{i}"] for i in range(10)] and results[10] == ["A", "B"]
    assert max(seen[:4]) <= 4 and sum(seen[:4]) >= 8 and len(seen) < 12  # batched, never above max_batch
    assert thread == "danlu-model"  # other calls run in the model thread too
    assert any(isinstance(o, Overloaded) for o in outcomes)  # queue of 1: the rest is refused at once
    assert [["X"]] == [o for o in outcomes if not isinstance(o, Exception)][:1]


def test_micro_batcher_drops_timed_out_requests_and_survives_errors():
    calls = []

    def fn(payloads):
        calls.append(payloads)
        if "boom" in payloads:
            raise ValueError("boom")
        time.sleep(0.05)
        return [p.upper() for p in payloads]

    async def main():
        batcher = MicroBatcher(fn, max_batch=1, max_wait_ms=0)
        first = batcher.put("a")  # runs while the next two wait
        late = batcher.put("late")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(late, 0.01)
        failed = batcher.put("boom")
        with pytest.raises(ValueError):
            await failed
        after = await batcher.put("b")
        await batcher.close()
        with pytest.raises(Overloaded):
            batcher.put("c")
        return await first, after

    assert asyncio.run(main()) == ("A", "B")
    assert ["late"] not in calls  # cancelled before its turn: never computed


def test_metrics_exposition_format():
    m = Metrics()
    for seconds in (0.002, 0.02, 3.0):
        m.observe_request("/v1/predict", "POST", 200, seconds)
    m.observe_request("/v1/predict", "POST", 503, 0.001)
    m.add_tokens(prompt=5, completion=7)
    m.observe_batch("predict", 3)
    text = m.render()
    assert 'danlu_requests_total{route="/v1/predict",method="POST",status="200"} 3' in text
    assert 'danlu_request_duration_seconds_bucket{route="/v1/predict",le="+Inf"} 4' in text
    assert 'danlu_request_duration_seconds_count{route="/v1/predict"} 4' in text
    assert "danlu_generated_tokens_total 7" in text and "danlu_rejected_total 1" in text
    buckets = [int(v) for v in re.findall(r'route="/v1/predict",le="[^"]+"} (\d+)', text)]
    assert buckets == sorted(buckets)  # cumulative
    for line in text.splitlines():  # every sample line is `name{labels} number`
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [0-9.e+-]+", line), line


# ---------------------------------------------------------------------------------- classifier


def test_predict_one_and_many_texts_match_the_run(cls_url, cls_run):
    texts = ["质量很好，推荐", "太差了，退货", "包装 bad awful"]
    r = httpx.post(cls_url + "/v1/predict", json={"texts": texts}, headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    expected = cls_run.predict(texts)
    assert body["model"] == "cls" and [p["index"] for p in body["data"]] == [0, 1, 2]
    for got, want in zip(body["data"], expected):
        assert got["label"] == want["label"] and set(got["probabilities"]) == set(cls_run.labels)
        assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)
    one = httpx.post(cls_url + "/v1/predict", json={"texts": texts[0], "top_k": 1, "model": "cls"}, headers=AUTH).json()
    assert len(one["data"]) == 1 and list(one["data"][0]["probabilities"]) == [expected[0]["label"]]


def _not_valid(body):
    raise ValueError("every body goes on to FastAPI")


def test_lean_predict_path_answers_exactly_as_fastapi(cls_run):
    """/v1/predict goes through metrics, guard and LeanPredictMiddleware before FastAPI's stack: the
    answers, errors included, must be byte for byte the ones the FastAPI route gives, and be counted once."""
    bodies = [{"texts": "质量很好"}, {"texts": ["太差了", "还行吧 ok"], "top_k": 1}, {"texts": ["好"], "model": "cls"},
              {"texts": []}, {"texts": ["a"] * 9}, {"texts": ["a"], "model": "gpt-4"}, {"texts": 42}, {"text": "a"},
              {"texts": ["a"], "top_k": 0}]
    answers = []
    for lean in (True, False):
        app = create_app(Predictor(cls_run), ServeOptions(max_texts=8))
        if not lean:  # every request on to FastAPI's route
            app.state.lean_predict.validate = _not_valid
        with ServerThread(app) as url:
            answers.append([(r.status_code, r.headers["content-type"], r.content)
                            for r in (httpx.post(url + "/v1/predict", json=b) for b in bodies)])
            metrics = httpx.get(url + "/metrics").text
        counted = sum(float(n) for n in re.findall(r'danlu_requests_total\{route="/v1/predict"[^}]*\} (\S+)', metrics))
        assert counted == len(bodies)
    assert [a[0] for a in answers[0]] == [200, 200, 200, 400, 400, 404, 400, 400, 400]
    assert answers[0] == answers[1]


def test_models_health_metrics_playground(cls_url):
    models = httpx.get(cls_url + "/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["cls"]
    assert httpx.get(cls_url + "/v1/models/cls", headers=AUTH).json()["id"] == "cls"
    assert_error(httpx.get(cls_url + "/v1/models/other", headers=AUTH), 404, "model_not_found")
    health = httpx.get(cls_url + "/health").json()
    assert health == {"status": "ok", "model": "cls", "kind": "classifier", "queue_depth": 0}
    httpx.post(cls_url + "/v1/predict", json={"texts": ["好"]}, headers=AUTH)
    text = httpx.get(cls_url + "/metrics").text
    assert re.search(r'danlu_requests_total\{route="/v1/predict",method="POST",status="200"\} [1-9]', text)
    assert 'danlu_batch_size_count{batcher="predict"}' in text
    page = httpx.get(cls_url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert '"kind": "classifier"' in page.text and "http://" not in page.text.split("<script", 1)[1]  # no CDN


@pytest.mark.parametrize("case", [
    "malformed_json", "wrong_type", "empty_list", "too_many", "oversized", "unknown_model", "extra_field",
    "no_key", "wrong_key", "not_bearer", "unknown_route", "wrong_method", "lm_route", "bad_top_k",
])
def test_classifier_bad_inputs_get_openai_errors(cls_url, case):
    post = lambda **kw: httpx.post(cls_url + "/v1/predict", **kw)
    if case == "malformed_json":
        assert_error(post(content=b'{"texts": [', headers={**AUTH, "content-type": "application/json"}), 400, "invalid_json")
    elif case == "wrong_type":
        assert assert_error(post(json={"texts": 42}, headers=AUTH), 400)["param"].startswith("texts")
    elif case == "empty_list":
        assert_error(post(json={"texts": []}, headers=AUTH), 400, "empty")
    elif case == "too_many":
        assert_error(post(json={"texts": ["a"] * 9}, headers=AUTH), 400, "too_many_texts")
    elif case == "oversized":
        assert_error(post(json={"texts": ["好" * 5000]}, headers=AUTH), 413, "body_too_large")
    elif case == "unknown_model":
        assert_error(post(json={"texts": ["a"], "model": "gpt-4"}, headers=AUTH), 404, "model_not_found")
    elif case == "extra_field":
        assert assert_error(post(json={"texts": ["a"], "temperature": 1}, headers=AUTH), 400)["param"] == "temperature"
    elif case == "no_key":
        r = post(json={"texts": ["a"]})
        assert assert_error(r, 401, "invalid_api_key")["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    elif case == "wrong_key":
        assert_error(post(json={"texts": ["a"]}, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    elif case == "not_bearer":
        assert_error(post(json={"texts": ["a"]}, headers={"Authorization": KEY}), 401)
    elif case == "unknown_route":
        assert_error(httpx.get(cls_url + "/v1/nothing", headers=AUTH), 404, "not_found")
    elif case == "wrong_method":
        assert_error(httpx.get(cls_url + "/v1/predict", headers=AUTH), 405)
    elif case == "lm_route":
        err = assert_error(httpx.post(cls_url + "/v1/chat/completions", json={}, headers=AUTH), 404)
        assert "classifier" in err["message"]
    elif case == "bad_top_k":
        assert_error(post(json={"texts": ["a"], "top_k": 0}, headers=AUTH), 400)


# ---------------------------------------------------------------------------------- language model


@pytest.fixture(scope="module")
def client(lm_url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=lm_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(run, prompt, n, stop=()):
    from danlu.generation import generate

    return generate(run.model, run.tokenizer, [prompt], max_new_tokens=n, temperature=0, stop=stop)[0]


def test_openai_chat_completion(client, lm_run):
    messages = [{"role": "user", "content": "你好"}]
    r = client.chat.completions.create(model="lm", messages=messages, temperature=0, max_tokens=12)
    prompt = render_chat(DEFAULT_TEMPLATE, messages)
    assert r.object == "chat.completion" and r.model == "lm" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy(lm_run, prompt, 12, stop=("<|im_end|>",))
    assert len(choice.message.content) > 0
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(lm_run.tokenizer.tokenizer_.encode(prompt, add_special_tokens=False).ids)
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    many = client.chat.completions.create(model="lm", messages=messages, temperature=0, max_tokens=6, n=2)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].message.content == many.choices[1].message.content


def test_openai_chat_stream_equals_non_stream(client):
    messages = [{"role": "system", "content": "简短"}, {"role": "user", "content": "今天天气"}]
    full = client.chat.completions.create(model="lm", messages=messages, temperature=0, max_tokens=16)
    stream = client.chat.completions.create(model="lm", messages=messages, temperature=0, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(deltas) > 1 and "".join(deltas) == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_openai_completions_batch_stream_and_stop(client, lm_run):
    r = client.completions.create(model="lm", prompt=["你好", "丹炉"], temperature=0, max_tokens=10)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [greedy(lm_run, "你好", 10), greedy(lm_run, "丹炉", 10)]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="lm", prompt="你好", temperature=0, max_tokens=10, stream=True))
    assert streamed == r.choices[0].text
    full = r.choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="lm", prompt="你好", temperature=0, max_tokens=10, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    echo = client.completions.create(model="lm", prompt="你好", temperature=0, max_tokens=3, echo=True)
    assert echo.choices[0].text.startswith("你好")


def test_serving_a_language_model_in_bf16(lm_run, cls_run):
    """`danlu serve --precision bf16`: the model decodes with bf16 weights and answers what generate()
    gives for the same bf16 weights; a classifier run is refused with the reason."""
    predictor = Predictor.from_run(lm_run.path, precision="bf16")
    assert next(predictor.run.model.parameters()).dtype == torch.bfloat16
    with ServerThread(create_app(predictor, ServeOptions(max_tokens=24))) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "lm", "prompt": "你好", "temperature": 0, "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy(predictor.run, "你好", 8)
    with pytest.raises(ConfigError, match="--precision bf16: for language-model runs; .* is a classification run"):
        Predictor.from_run(cls_run.path, precision="bf16")


def test_seeded_sampling_is_repeatable(client):
    kw = {"model": "lm", "prompt": "今天", "temperature": 1.0, "top_p": 0.9, "max_tokens": 12, "seed": 7}
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_concurrent_completions_are_batched_and_equal_to_single(lm_url, lm_run):
    prompts = ["你好", "丹炉", "今天", "hello", "the", "我们", "模型", "公园"]

    async def main():
        async with httpx.AsyncClient(base_url=lm_url, headers=AUTH, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={"model": "lm", "prompt": p, "temperature": 0,
                                                                         "max_tokens": 8}) for p in prompts))
            return [r.json()["choices"][0]["text"] for r in rs]

    texts = asyncio.run(main())
    assert texts == [greedy(lm_run, p, 8) for p in prompts]  # left-padded batches decode exactly as alone
    metrics = httpx.get(lm_url + "/metrics").text
    sizes = {float(le): int(n) for le, n in re.findall(r'danlu_batch_size_bucket\{batcher="generate",le="([0-9.]+)"\} (\d+)', metrics)}
    count = int(re.search(r'danlu_batch_size_count\{batcher="generate"\} (\d+)', metrics).group(1))
    assert count > sizes[1.0]  # at least one model call took more than one prompt
    assert int(re.search(r"danlu_generated_tokens_total (\d+)", metrics).group(1)) >= 64


class _EndlessLM:
    """A language-model predictor whose stream never ends by itself: only a closed connection stops it."""

    kind, name, task, created, chat_template, chat_stop, context_length = "language_model", "endless", "causal_lm", 0, "", (), 4096
    max_prompt_chars = 4096

    def __init__(self):
        self.closed = threading.Event()

    def count_tokens(self, text):
        return len(text)

    def stream(self, prompt, **sampling):
        closed = self.closed

        class Stream:
            def __iter__(self):
                return self

            def __next__(self):
                time.sleep(0.02)
                return "x"

            def close(self):
                closed.set()

        return Stream()

    def describe(self):
        return {"id": self.name, "kind": self.kind, "task": self.task, "model": "fake", "context_length": 4096}


def test_a_client_leaving_mid_stream_frees_its_slot_and_stops_generation():
    predictor = _EndlessLM()
    with ServerThread(create_app(predictor, ServeOptions(max_tokens=512))) as url:
        body = {"model": "endless", "prompt": "hi", "max_tokens": 500, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {") and "danlu_streams_active 1" in httpx.get(url + "/metrics").text
        assert predictor.closed.wait(10)  # the generator was closed, in the model thread
        for _ in range(100):
            if "danlu_streams_active 0" in httpx.get(url + "/metrics").text:
                break
            time.sleep(0.05)
        assert "danlu_streams_active 0" in httpx.get(url + "/metrics").text


@pytest.mark.parametrize("case", [
    "empty_messages", "no_model", "unknown_model", "max_tokens_over_limit", "context_exceeded", "bad_role",
    "bad_temperature", "too_many_stops", "stream_n", "wrong_key", "no_key", "image_part", "predict_route",
    "prompt_type", "malformed_json",
])
def test_language_model_bad_inputs(lm_url, case):
    post = lambda path, body, headers=AUTH: httpx.post(lm_url + path, json=body, headers=headers)
    chat = {"model": "lm", "messages": [{"role": "user", "content": "hi"}]}
    if case == "empty_messages":
        assert assert_error(post("/v1/chat/completions", {**chat, "messages": []}), 400)["param"] == "messages"
    elif case == "no_model":
        assert_error(post("/v1/chat/completions", {"messages": chat["messages"]}), 400)
    elif case == "unknown_model":
        assert_error(post("/v1/chat/completions", {**chat, "model": "gpt-4o"}), 404, "model_not_found")
    elif case == "max_tokens_over_limit":
        assert assert_error(post("/v1/completions", {"model": "lm", "prompt": "a", "max_tokens": 25}), 400)["param"] == "max_tokens"
    elif case == "context_exceeded":
        assert_error(post("/v1/completions", {"model": "lm", "prompt": "好" * 250, "max_tokens": 20}), 400,
                     "context_length_exceeded")
    elif case == "bad_role":
        assert_error(post("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    elif case == "bad_temperature":
        assert assert_error(post("/v1/chat/completions", {**chat, "temperature": 5}), 400)["param"] == "temperature"
    elif case == "too_many_stops":
        assert_error(post("/v1/completions", {"model": "lm", "prompt": "a", "stop": list("abcde")}), 400)
    elif case == "stream_n":
        assert_error(post("/v1/chat/completions", {**chat, "stream": True, "n": 2}), 400)
    elif case == "wrong_key":
        assert_error(post("/v1/chat/completions", chat, {"Authorization": "Bearer " + KEY[:-1] + "x"}), 401)
    elif case == "no_key":
        assert_error(httpx.get(lm_url + "/v1/models"), 401)
    elif case == "image_part":
        image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
        assert_error(post("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": image}]}), 400)
    elif case == "predict_route":
        assert "language model" in assert_error(post("/v1/predict", {"texts": ["a"]}), 404)["message"]
    elif case == "prompt_type":
        assert_error(post("/v1/completions", {"model": "lm", "prompt": {"a": 1}}), 400)
    elif case == "malformed_json":
        r = httpx.post(lm_url + "/v1/completions", content=b"\xff\xfe", headers={**AUTH, "content-type": "application/json"})
        assert_error(r, 400)


def test_openai_client_errors(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lm", messages=[])
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in client.models.list()] == ["lm"]


# ---------------------------------------------------------------------------------- back-pressure, timeouts, crashes


class _Blocking:
    """A classifier predictor whose model call waits for `release` (or raises `fail`)."""

    kind, name, task, labels, created, chat_template = "classifier", "slow", "classification", ("a", "b"), 0, None

    def __init__(self, fail=None):
        self.release, self.fail, self.calls = threading.Event(), fail, 0

    def classify(self, texts, top_k=None):
        self.calls += 1
        if self.fail:
            raise self.fail
        self.release.wait(30)
        return [{"label": "a", "score": 0.9, "probabilities": {"a": 0.9, "b": 0.1}} for _ in texts]

    def describe(self):
        return {"id": self.name, "kind": self.kind, "task": self.task, "model": "fake", "labels": list(self.labels)}


def test_full_queue_answers_503_with_retry_after_then_recovers():
    predictor = _Blocking()
    options = ServeOptions(max_batch=1, max_wait_ms=0, max_queue=2, timeout_s=30)

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            first = asyncio.ensure_future(c.post("/v1/predict", json={"texts": ["x"]}))
            while predictor.calls == 0:  # the first request is inside the model
                await asyncio.sleep(0.01)
            queued = [asyncio.ensure_future(c.post("/v1/predict", json={"texts": ["x"]})) for _ in range(2)]
            await asyncio.sleep(0.2)
            refused = await asyncio.gather(*(c.post("/v1/predict", json={"texts": ["x"]}) for _ in range(3)))
            predictor.release.set()
            done = await asyncio.gather(first, *queued)
            return refused, done

    with ServerThread(create_app(predictor, options)) as url:
        refused, done = asyncio.run(main(url))
        after = httpx.post(url + "/v1/predict", json={"texts": ["x"]})
        metrics = httpx.get(url + "/metrics").text
    for r in refused:
        assert_error(r, 503, "overloaded")
        assert r.headers["retry-after"] == "1"
    assert [r.status_code for r in done] == [200, 200, 200] and after.status_code == 200
    assert "danlu_rejected_total 3" in metrics


def test_timeout_answers_504_and_crash_answers_500_without_details():
    slow = _Blocking()
    with ServerThread(create_app(slow, ServeOptions(timeout_s=0.2))) as url:
        assert_error(httpx.post(url + "/v1/predict", json={"texts": ["x"]}), 504, "timeout")
        slow.release.set()
    broken = _Blocking(fail=RuntimeError("secret detail /home/user/.ssh/id_rsa"))
    with ServerThread(create_app(broken, ServeOptions())) as url:
        r = httpx.post(url + "/v1/predict", json={"texts": ["x"]})
        assert_error(r, 500, "internal_error")
        assert "secret" not in r.text and "RuntimeError" not in r.text
        assert httpx.get(url + "/health").status_code == 200  # the server lives on


def test_host_header_allow_list_blocks_dns_rebinding(cls_run):
    from danlu.serve.app import LOOPBACK_HOSTS

    with ServerThread(create_app(Predictor(cls_run), ServeOptions(allowed_hosts=LOOPBACK_HOSTS))) as url:
        assert httpx.get(url + "/health").status_code == 200
        assert_error(httpx.get(url + "/health", headers={"Host": "evil.example:80"}), 400, "invalid_host")


# ---------------------------------------------------------------------------------- the CLI


def test_cli_serve_binds_loopback_and_takes_the_key_from_the_environment(cls_run):
    env = {**os.environ, "DANLU_API_KEY": "from-env", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "danlu", "serve", cls_run.path, "--port", "0"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        url = None
        deadline = time.time() + 90
        while time.time() < deadline and url is None:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            found = re.search(r"on (http://[0-9.]+:\d+)/", line)
            url = found.group(1) if found else None
        assert url and url.startswith("http://127.0.0.1:"), "danlu serve did not announce a loopback address"
        for _ in range(100):  # the socket listens before uvicorn finishes starting
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert_error(httpx.post(url + "/v1/predict", json={"texts": ["好"]}), 401)
        r = httpx.post(url + "/v1/predict", json={"texts": ["好"]}, headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200 and r.json()["data"][0]["label"] in cls_run.labels
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_playground_chats_with_danlu_chats_defaults(lm_url):
    """The playground's sampling settings come from CHAT_SAMPLING, not from numbers in the page."""
    from danlu.sampling import CHAT_SAMPLING

    page = httpx.get(lm_url + "/").text
    config = json.loads(page.split('<script id="danlu-config" type="application/json">', 1)[1].split("</script>", 1)[0])
    assert config["sampling"] == {k: getattr(CHAT_SAMPLING, k) for k in config["sampling"]}
    assert set(config["sampling"]) == {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty"}
    assert 'value="0.7"' not in page and 'value="64"' not in page


# ---------------------------------------------------------------------------------- log probabilities


def reference_logprobs(run, prompt_ids, generated_ids):
    """log-softmax of one plain forward over prompt + generated tokens, at the positions that predicted each
    generated token: (V,) per token."""
    ids = torch.tensor([list(prompt_ids) + list(generated_ids)])
    with torch.no_grad():
        logits = run.model.eval()(ids)[0].float()  # (T, V)
    start = len(prompt_ids) - 1
    return logits[start : start + len(generated_ids)].log_softmax(-1)  # (N, V)


def test_chat_logprobs_match_a_direct_forward_streamed_or_not(client, lm_run):
    messages = [{"role": "user", "content": "今天天气"}]
    r = client.chat.completions.create(model="lm", messages=messages, temperature=0, max_tokens=10, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content and len(content) > 1
    ids = [lm_run.tokenizer.token_id(e.token) for e in content]
    reference = reference_logprobs(lm_run, Predictor(lm_run).chat_ids(messages), ids)
    for e, token, expected in zip(content, ids, reference):
        assert e.logprob == pytest.approx(expected[token].item(), abs=1e-4)
        assert bytes(e.bytes).decode() == e.token
        top = expected.topk(3)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [lm_run.tokenizer.token_id(t.token) for t in e.top_logprobs] == top.indices.tolist()
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely one
    stream = client.chat.completions.create(model="lm", messages=messages, temperature=0, max_tokens=10, logprobs=True,
                                            top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob, len(e.top_logprobs)) for e in streamed] == \
        [(e.token, e.logprob, len(e.top_logprobs)) for e in content]
    plain = client.chat.completions.create(model="lm", messages=messages, temperature=0, max_tokens=10, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    without = client.chat.completions.create(model="lm", messages=messages, temperature=0, max_tokens=4)
    assert without.choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(client, lm_run):
    r = client.completions.create(model="lm", prompt=["你好", "丹炉"], temperature=0, max_tokens=8, logprobs=2, stop=["。"])
    for prompt, choice in zip(["你好", "丹炉"], r.choices):
        lp = choice.logprobs
        assert "".join(lp.tokens) == choice.text and len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
        assert lp.text_offset[0] == len(prompt)
        assert [b - a for a, b in zip(lp.text_offset, lp.text_offset[1:])] == [len(t) for t in lp.tokens[:-1]]
        ids = [lm_run.tokenizer.token_id(t) for t in lp.tokens]
        reference = reference_logprobs(lm_run, Predictor(lm_run).encode(prompt), ids)
        assert lp.token_logprobs == pytest.approx([row[t].item() for row, t in zip(reference, ids)], abs=1e-4)
        assert all(len(d) == 2 and max(d.values()) == pytest.approx(v, abs=1e-6)
                   for d, v in zip(lp.top_logprobs, lp.token_logprobs))
    chunks = list(client.completions.create(model="lm", prompt="你好", temperature=0, max_tokens=8, logprobs=2,
                                            stop=["。"], stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == r.choices[0].logprobs.tokens


def test_sampled_tokens_get_their_own_logprob(client, lm_run):
    """With temperature 1 the chosen token is often not the most likely one; its logprob is still its own (the
    model's distribution, before temperature), and the top list stays sorted."""
    r = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hello"}], temperature=1.0,
                                       seed=3, max_tokens=12, logprobs=True, top_logprobs=5)
    for e in r.choices[0].logprobs.content:
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and e.logprob <= values[0] + 1e-6


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "logprobs": 1, "echo": True}, "logprobs"),
])
def test_bad_logprobs_requests_name_the_field(lm_url, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(lm_url + path, json={"model": "lm", "max_tokens": 2, **body}, headers=AUTH)
    assert assert_error(r, 400)["param"] == param


def test_token_bytes_of_a_byte_level_tokenizer_rebuild_the_text(tmp_path):
    """A byte-level BPE token can hold part of a Chinese character: its bytes are exact."""
    from danlu.serve.engine import token_piece

    run = language_model_run(str(tmp_path / "bpe"), steps=1, tokenizer_kind="bpe")
    text = "丹炉可以训练模型"
    ids = run.tokenizer.tokenizer_.encode(text, add_special_tokens=False).ids
    pieces = [token_piece(run.tokenizer, i) for i in ids]
    assert b"".join(bytes(raw) for _, raw in pieces).decode() == text
