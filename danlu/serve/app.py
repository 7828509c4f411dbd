"""The HTTP app: predictions for classifiers, OpenAI-compatible completions for language models.

    GET  /                      playground (label bars, or a streaming chat)
    GET  /health, /metrics      liveness; Prometheus text
    GET  /v1/models[/{id}]      the one served model
    POST /v1/predict            classifiers: {"texts": [...]} -> labels and probabilities
    POST /v1/chat/completions   language models, OpenAI's schema, streaming (SSE) or not
    POST /v1/completions        language models, OpenAI's legacy completion schema

Every /v1 route needs `Authorization: Bearer KEY` when the app has an API key (compared in constant
time). Every error is OpenAI's JSON error shape; a failure inside the server answers a generic 500
with `Connection: close` and is logged on the server, never sent to the client with its traceback.

Each request is checked on its own before it meets any other: its body (Content-Type, UTF-8, JSON,
strict types: schemas.py), its size in characters, then, in a worker thread and under the request's
timeout, its chat template and its token count. A request that times out (504) or whose client
disconnects stops its generation at the next decoding step and leaves the queue.

>>> app = create_app(Predictor.from_run("runs/seed_lstm"), ServeOptions(api_key="secret"))  # doctest: +SKIP
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from importlib import resources

from danlu.serve.batching import MicroBatcher, Overloaded
from danlu.serve.errors import CLOSE, ERROR_TYPES, APIError
from danlu.serve.metrics import Metrics
from danlu.serve.middleware import GuardMiddleware, LeanPredictMiddleware, MetricsMiddleware, error_body

log = logging.getLogger("danlu.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
PLAYGROUND_PLACEHOLDER = "__DANLU_CONFIG__"


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` on every /v1 route (None: no key)."""
    max_batch: int = 32
    """Texts (or prompts) per model call; 1 turns micro-batching off."""
    max_wait_ms: float = 2.0
    """How long a request that finds the model idle and nobody queued may wait for company (only under load)."""
    max_queue: int = 256
    """Requests waiting for the model (and streams running) beyond which the server answers 503."""
    max_body_bytes: int = 1 << 20
    """Largest request body, in bytes (1 MiB); a larger one answers 413."""
    max_texts: int = 256
    """Texts per /v1/predict request."""
    max_tokens: int = 512
    """Largest max_tokens a completion may ask for."""
    chat_max_tokens: int = 256
    """max_tokens of a chat completion that does not say (OpenAI's default is the whole context, which
    on a CPU takes minutes); at most max_tokens and the room left in the context."""
    max_prompts: int = 16
    """Prompts per /v1/completions request."""
    timeout_s: float = 60.0
    """A request that has not finished (queued + computed) after this long answers 504."""
    allowed_hosts: tuple | None = None
    """Host headers accepted (None: any). `danlu serve` on a loopback address sets the loopback names,
    which defeats DNS rebinding: a web page cannot reach the local server through its own domain."""
    template_time_s: float = 2.0
    """Longest a chat template may render for one request (a template that loops is stopped: 400)."""
    stream_steps: int = 3
    """Decoding steps a language model's streamed requests take for each step of the whole batch, while
    they are at most half of it (1: streams wait for the batch like the others)."""

    def __post_init__(self):
        """Refuse limits that would refuse every request (`--max-queue 0`) at start, naming the flag."""
        from danlu.registry import ConfigError

        for f in fields(self):
            if f.type not in (int, float):
                continue
            value = getattr(self, f.name)
            flag = "--timeout" if f.name == "timeout_s" else f"--{f.name.replace('_', '-')}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"serve: {flag}: expected a number, got {value!r}")
            if f.type is int and not value >= 1:
                raise ConfigError(f"serve: {flag} must be at least 1, got {value!r} (it would refuse every request)")
            if f.type is float and not (value >= 0 if f.name == "max_wait_ms" else value > 0):  # refuses NaN too
                least = "at least 0" if f.name == "max_wait_ms" else "more than 0"
                raise ConfigError(f"serve: {flag} must be {least}, got {value!r}")





def create_app(predictor, options: ServeOptions | None = None):
    """A FastAPI app serving `predictor` (a danlu.serve.Predictor)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from danlu.chat_template import TemplateError
    from danlu.serve import schemas as s

    options = options or ServeOptions()
    state = _State(predictor, options)
    classifier = predictor.kind == "classifier"
    seq2seq = predictor.kind == "seq2seq"  # text to text: /v1/predict returns text, and the completion routes work

    async def lifespan(app):
        yield
        await state.close()

    class App(FastAPI):
        front = None  # danlu's own middleware, which every HTTP request meets before FastAPI's stack

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                return await self.front(scope, receive, send)
            return await super().__call__(scope, receive, send)

    app = App(title=f"danlu serve: {predictor.name}", version="1", docs_url=None, redoc_url=None,
                  lifespan=lifespan, description=f"danlu {predictor.kind} `{predictor.name}`.")
    app.state.danlu = state
    errors = {code: {"model": s.ErrorResponse, "description": text} for code, text in (
        (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
        (413, "Request body too large"), (415, "Content-Type is not application/json"), (503, "Server overloaded; retry after Retry-After seconds"),
        (504, "Request timed out"))}

    # -- errors: always OpenAI's shape, never a traceback -----------------------------------------
    def reply(status, message, type=None, param=None, code=None, headers=None):
        return JSONResponse(error_body(message, type or ERROR_TYPES.get(status, "invalid_request_error"), param, code),
                            status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return reply(e.status, e.message, e.type, e.param, e.code, {**e.headers, **(CLOSE if e.status == 500 else {})})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        problem = body_problem(request.headers.get("content-type", ""), await request.body())
        if problem is not None:
            return reply(problem[0], problem[1], code=problem[2])
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        loc = _field_path(first.get("loc", ()))
        param = ".".join(loc) or None
        if loc and loc[0] in s.UNSUPPORTED:
            return reply(400, f"{loc[0]}: {s.UNSUPPORTED[loc[0]]}; leave it out", param=loc[0],
                         code="unsupported_parameter")
        where = f"{param}: " if param else ""
        return reply(400, f"{where}{first.get('msg', 'invalid value')}", param=param, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        if e.status_code == 404:
            return reply(404, _not_found_message(request.url.path, classifier), code="not_found")
        if e.status_code == 405:
            return reply(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed",
                         headers=getattr(e, "headers", None))
        if e.status_code == 400:  # FastAPI's "There was an error parsing the body"
            problem = body_problem(request.headers.get("content-type", ""), await request.body())
            if problem is not None:
                return reply(problem[0], problem[1], code=problem[2])
        return reply(e.status_code, str(e.detail))

    @app.exception_handler(TemplateError)
    async def _template_error(request, e):
        return reply(400, str(e), param="messages", code="chat_template")

    @app.exception_handler(Exception)
    async def _crash(request, e):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return reply(500, "internal server error; the server log has the details", code="internal_error",
                     headers=CLOSE)

    # -- always there -----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(state.playground_html(), headers={"Content-Security-Policy": PLAYGROUND_CSP,
                                                             "Cache-Control": "no-store"})

    @app.get("/health", response_model=s.Health, tags=["server"])
    async def health():
        return s.Health(model=predictor.name, kind=predictor.kind, queue_depth=state.depth)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["server"],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=s.ModelList, responses=errors, tags=["models"])
    async def list_models():
        return s.ModelList(data=[state.card()])

    @app.get("/v1/models/{model_id}", response_model=s.ModelCard, responses=errors, tags=["models"])
    async def get_model(model_id: str):
        state.check_model(model_id, param=None)
        return state.card()

    # -- classifiers ------------------------------------------------------------------------------
    if classifier or seq2seq:
        image_input = getattr(predictor, "input", "text") == "image"  # image runs: danlu.serve.images
        PredictBody = s.ImagePredictRequest if image_input else s.PredictRequest

        async def predict_json(body: PredictBody) -> bytes:
            """The answer to a valid request, serialized (APIError for a request the model cannot take)."""
            if body.model is not None:
                state.check_model(body.model)
            if body.images is not None or image_input:
                from danlu.serve.images import request_images

                texts = request_images(body, predictor, options.max_texts)
            else:
                texts = [body.texts] if isinstance(body.texts, str) else list(body.texts)
            if not texts:
                raise APIError(400, "texts: give at least one text", param="texts", code="empty")
            if len(texts) > options.max_texts:
                raise APIError(400, f"texts: at most {options.max_texts} texts per request, got {len(texts)}",
                               param="texts", code="too_many_texts")
            explain = getattr(body, "explain", False)
            if explain and (seq2seq or image_input):
                raise APIError(400, "explain: explanations are for text classifiers and regressors",
                               param="explain", code="unsupported_parameter")
            if seq2seq:  # decoded as the run's seq2seq section says (beam search by default)
                results = await state.run(Job([(t, {}) for t in texts]), state.deadline())
                data = [s.Prediction(index=i, text=text) for i, (text, _, _) in enumerate(results)]
                return s.PredictResponse(model=predictor.name, data=data).model_dump_json(exclude_none=True).encode()
            deadline = state.deadline()
            results = await state.run(texts, deadline)
            explained = (await state.prepare(deadline, predictor.explain, texts, executor=state.executor) if explain
                         else [None] * len(texts))
            data = []
            for i, (r, e) in enumerate(zip(results, explained)):
                if "value" in r:
                    data.append(s.Prediction(index=i, value=r["value"], explanation=e))
                    continue
                probs = r["probabilities"]
                if body.top_k:
                    probs = dict(list(probs.items())[: body.top_k])
                data.append(s.Prediction(index=i, label=r["label"], score=r["score"], probabilities=probs,
                                         explanation=e))
            return s.PredictResponse(model=predictor.name, data=data).model_dump_json(exclude_none=True).encode()

        @app.post("/v1/predict", response_model=s.PredictResponse, response_model_exclude_none=True,
                  responses=errors, tags=["predict"])
        async def predict(body: PredictBody):
            """Classify one or many texts: labels, scores and the probability of every label."""
            # serialized here: returning the model would have FastAPI validate and encode it a second time
            return Response(await predict_json(body), media_type="application/json")

    # -- language models --------------------------------------------------------------------------
    if not classifier:
        event = {"type": "object", "required": ["data"], "properties": {  # one server-sent event
            "data": {"type": "string", "description": "a JSON chunk, or [DONE]"}, "event": {"type": "string"}}}
        stream_doc = {200: {"content": {"text/event-stream": {"schema": event}},
                            "description": "JSON, or server-sent events with `stream: true`"}, **errors}

        @app.post("/v1/completions", response_model=s.CompletionResponse, responses=stream_doc,
                  tags=["completions"])
        async def completions(body: s.CompletionRequest, request: Request):
            """Continue a prompt (or a list of prompts), OpenAI's completion API."""
            deadline = state.deadline()
            state.check_model(body.model)
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            if not prompts:
                raise APIError(400, "prompt: give at least one prompt", param="prompt", code="empty")
            if len(prompts) > options.max_prompts:
                raise APIError(400, f"prompt: at most {options.max_prompts} prompts per request", param="prompt")
            if body.stream and (len(prompts) > 1 or body.n > 1):
                raise APIError(400, "stream: streaming takes one prompt and n=1", param="stream")
            for p in prompts:
                state.check_chars(len(p), "prompt")
            if state.engine is not None:  # token ids, as the engine decodes them
                inputs = await state.prepare(deadline, lambda: [predictor.encode(p) for p in prompts])
                counts = [len(ids) for ids in inputs]
            else:
                inputs, counts = prompts, await state.prepare(deadline, lambda: [predictor.count_tokens(p) for p in prompts])
            if body.logprobs is not None and body.echo:
                raise APIError(400, "logprobs: the prompt's log probabilities (echo with logprobs) are not returned "
                                    "by this server; leave out echo or logprobs", param="logprobs",
                               code="unsupported_parameter")
            sampling = state.sampling(body, counts, default_max=16, logprobs=body.logprobs)
            if body.stream:
                return StreamingResponse(state.stream(inputs[0], sampling, "text_completion", counts[0],
                                                      body.stream_options, deadline, echo=prompts[0] if body.echo else None,
                                                      prompt_chars=len(prompts[0])),
                                         media_type="text/event-stream", headers=SSE_HEADERS)
            results = await state.generate([p for p in inputs for _ in range(body.n)], sampling, deadline,
                                           request.receive)
            choices, completion_tokens = [], 0
            for i, ((text, used, finish, *logprobs), prompt) in enumerate(zip(results, [p for p in prompts for _ in range(body.n)])):
                completion_tokens += used
                scored = s.completion_logprobs(logprobs[0], len(prompt)) if logprobs and logprobs[0] is not None else None
                choices.append(s.CompletionChoice(index=i, text=(prompt + text) if body.echo else text,
                                                  finish_reason=finish, logprobs=scored))
            usage = state.usage(sum(counts), completion_tokens)  # OpenAI counts each prompt once, whatever n
            return s.CompletionResponse(id=_new_id("cmpl"), created=int(time.time()), model=predictor.name,
                                        choices=choices, usage=usage)

        @app.post("/v1/chat/completions", response_model=s.ChatCompletionResponse, responses=stream_doc,
                  tags=["chat"])
        async def chat_completions(body: s.ChatCompletionRequest, request: Request):
            """Answer a conversation with the run's chat template, OpenAI's chat completion API."""
            deadline = state.deadline()
            state.check_model(body.model)
            if body.stream and body.n > 1:
                raise APIError(400, "n: streaming takes n=1", param="n")
            messages = [{"role": m.role, "content": _content(m.content)} for m in body.messages]
            state.check_chars(sum(len(m["content"]) for m in messages), "messages")
            if body.max_completion_tokens is not None and body.max_tokens is None:
                body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
            limit = min(options.template_time_s, max(0.0, deadline - time.monotonic()))
            if state.engine is not None:  # token ids: the messages' text encoded as plain text
                prompt = await state.prepare(deadline, predictor.chat_ids, messages, limit)
                count = len(prompt)
            else:  # a predictor without an engine takes the prompt as a string
                prompt = await state.prepare(deadline, predictor.chat_prompt, messages, limit)
                count = await state.prepare(deadline, predictor.count_tokens, prompt)
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
            sampling = state.sampling(body, [count], default_max=options.chat_max_tokens,
                                      extra_stop=predictor.chat_stop,
                                      logprobs=(body.top_logprobs or 0) if body.logprobs else None)
            if body.stream:
                return StreamingResponse(state.stream(prompt, sampling, "chat.completion.chunk", count,
                                                      body.stream_options, deadline),
                                         media_type="text/event-stream", headers=SSE_HEADERS)
            results = await state.generate([prompt] * body.n, sampling, deadline, request.receive)
            choices, completion_tokens = [], 0
            for i, (text, used, finish, *logprobs) in enumerate(results):
                completion_tokens += used
                scored = s.chat_logprobs(logprobs[0]) if logprobs and logprobs[0] is not None else None
                choices.append(s.ChatChoice(index=i, message=s.AssistantMessage(content=text), finish_reason=finish,
                                            logprobs=scored))
            usage = state.usage(count, completion_tokens)  # the prompt once, however many choices
            return s.ChatCompletionResponse(id=_new_id("chatcmpl"), created=int(time.time()), model=predictor.name,
                                            choices=choices, usage=usage)

    def openapi():
        """The spec names the one model this server answers to, so that clients and fuzzers know it."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for schema in spec.get("components", {}).get("schemas", {}).values():
                model = schema.get("properties", {}).get("model")
                if model is not None and "model" in schema.get("required", []):
                    model.update({"type": "string", "enum": [predictor.name]})
            for parameter in spec["paths"].get("/v1/models/{model_id}", {}).get("get", {}).get("parameters", []):
                parameter["schema"].update({"type": "string", "enum": [predictor.name]})
            if options.api_key:
                spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in spec["paths"].items():
                    if path.startswith("/v1"):
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi

    # danlu's middleware, outermost first: metrics see every answer, including the guard's 401 / 413; valid
    # /v1/predict requests are answered by the lean handler, everything else goes on to FastAPI's stack
    async def fastapi(scope, receive, send):
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            return await FastAPI.__call__(app, scope, receive, watch)
        except Exception:  # Starlette re-raises a crash after its 500 (with Connection: close) went out
            if not started:
                raise

    inner = fastapi
    if classifier:
        inner = app.state.lean_predict = LeanPredictMiddleware(
            fastapi, validate=PredictBody.model_validate_json, answer=predict_json, api_error=APIError)
    if classifier and image_input:  # image runs also take multipart uploads
        from danlu.serve.images import ImageUploadMiddleware

        inner = ImageUploadMiddleware(inner, answer=predict_json, api_error=APIError, request_class=PredictBody)
    app.front = MetricsMiddleware(GuardMiddleware(inner, options=options), state.metrics, _route_templates(app))
    return app


# ------------------------------------------------------------------------------------------------


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PLAYGROUND_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                  "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _State:
    """What the routes share: the predictor, its model thread and batchers, metrics, limits."""

    def __init__(self, predictor, options):
        self.predictor, self.options = predictor, options
        self.metrics = Metrics()
        kind = "predict" if predictor.kind == "classifier" else "generate"
        # a language model's runs decode in the continuous-batching engine (its own model thread); a classifier,
        # a seq2seq run (beam search decodes a whole batch at once) or a predictor without an engine goes
        # through the micro-batcher
        self.engine, self.outbox = None, _Outbox()
        if predictor.kind == "language_model" and hasattr(predictor, "engine"):
            self.engine = predictor.engine(options.max_batch, options.max_queue,
                                           on_step=lambda rows: self.metrics.observe_batch("generate", rows),
                                           stream_steps=options.stream_steps)
            self.engine.flush = self.outbox.flush
        fn = self._classify_batch if kind == "predict" else self._generate_batch
        self.batcher = MicroBatcher(fn, options.max_batch, options.max_wait_ms, options.max_queue, size=len,
                                    on_batch=lambda units, _: self.metrics.observe_batch(kind, units))
        self.executor = self.batcher  # the model thread: batches, and each step of a stream in turn with them
        # chat templates and tokenization: off the event loop, and off the model thread, which they would stall
        self.workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="danlu-prepare")
        self.streams = 0
        self.metrics.gauges["danlu_queue_depth"] = lambda: self.depth
        self.metrics.gauges["danlu_streams_active"] = lambda: self.streams
        self._html = None

    @property
    def depth(self):
        return self.batcher.depth + (self.engine.depth if self.engine is not None else 0)

    async def close(self):
        await self.batcher.close()
        if self.engine is not None:
            self.engine.close()
        self.workers.shutdown(wait=False, cancel_futures=True)

    # -- model calls ------------------------------------------------------------------------------
    def deadline(self):
        """When a request that arrives now answers 504 (time.monotonic())."""
        return time.monotonic() + self.options.timeout_s

    def timed_out(self):
        return APIError(504, f"the request did not finish within {self.options.timeout_s:g} s", code="timeout")

    async def prepare(self, deadline, fn, *args, executor=None):
        """fn(*args) in a worker thread (a chat template, a tokenizer), or in `executor` (the model thread, between
        batches, for work that hooks the model: explanations), within the request's deadline."""
        future = asyncio.get_running_loop().run_in_executor(executor or self.workers, fn, *args)
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise self.timed_out() from None

    async def run(self, payload, deadline, receive=None):
        """Submit a payload (a list, or a Job) to the batcher and wait for it until `deadline`; a client that
        disconnects meanwhile (`receive` gives http.disconnect) or the deadline cancels the work."""
        try:
            future = self.batcher.put(payload)
        except Overloaded as e:
            raise APIError(503, str(e), code="overloaded", headers={"Retry-After": str(e.retry_after)}) from None
        gone = asyncio.ensure_future(_disconnect(receive)) if receive is not None else None
        try:
            done, _ = await asyncio.wait([future] + ([gone] if gone else []), return_when=asyncio.FIRST_COMPLETED,
                                         timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            _cancel(future, payload)
            raise
        finally:
            if gone is not None:
                gone.cancel()
        if future in done:
            return future.result()
        _cancel(future, payload)
        if gone is not None and gone in done:
            raise APIError(499, "the client closed the connection", code="client_closed")
        raise self.timed_out()

    async def generate(self, prompts, sampling, deadline, receive=None):
        """[(text, completion_tokens, finish_reason)] per prompt (token ids with the engine), decoded by the
        engine (or the micro-batcher), until `deadline`; a disconnect or the deadline cancels them all."""
        if self.engine is None:
            return await self.run(Job([(p, sampling) for p in prompts]), deadline, receive)
        from danlu.serve.engine import Request as Generation

        loop = asyncio.get_running_loop()
        futures, requests = [], []
        try:
            for ids in prompts:
                future = loop.create_future()
                requests.append(Generation(ids, dict(sampling), _emitter(self.outbox, loop, future)))
                futures.append(future)
                self.engine.submit(requests[-1])
        except Overloaded as e:
            for r in requests:
                r.cancelled.set()
            raise APIError(503, str(e), code="overloaded", headers={"Retry-After": str(e.retry_after)}) from None
        gone = asyncio.ensure_future(_disconnect(receive)) if receive is not None else None
        together = asyncio.gather(*futures)
        try:
            done, _ = await asyncio.wait([together] + ([gone] if gone else []), return_when=asyncio.FIRST_COMPLETED,
                                         timeout=max(0.0, deadline - time.monotonic()))
        finally:
            if gone is not None:
                gone.cancel()
            if not together.done():
                for r in requests:
                    r.cancelled.set()  # leaves the batch before the next decoding step
                together.cancel()
        if together in done:
            return together.result()
        if gone is not None and gone in done:
            raise APIError(499, "the client closed the connection", code="client_closed")
        raise self.timed_out()

    def _classify_batch(self, payloads):
        texts = [t for p in payloads for t in p]
        results = self.predictor.classify(texts)
        out, i = [], 0
        for p in payloads:
            out.append(results[i : i + len(p)])
            i += len(p)
        return out

    def _generate_batch(self, payloads):
        """payloads: Jobs of (prompt, sampling); prompts with the same sampling settings share one call, which
        stops at the next decoding step once every job in it is cancelled."""
        flat = [(pi, j, prompt, sampling) for pi, p in enumerate(payloads) for j, (prompt, sampling) in enumerate(p)]
        groups = {}
        for entry in flat:
            groups.setdefault(_sampling_key(entry[3]), []).append(entry)
        out = [[None] * len(p) for p in payloads]
        for entries in groups.values():
            jobs = [payloads[pi] for pi in {e[0] for e in entries}]
            cancelled = lambda jobs=jobs: all(job.cancelled.is_set() for job in jobs)  # noqa: E731
            if cancelled():
                continue
            results = self.predictor.complete([e[2] for e in entries], cancelled=cancelled, **entries[0][3])
            for (pi, j, _, _), result in zip(entries, results or ()):
                out[pi][j] = result
        return out

    # -- language-model helpers -------------------------------------------------------------------
    def check_chars(self, chars, param):
        """Refuse a prompt too long for the context by its characters alone, before any tokenizer sees it."""
        limit = self.predictor.max_prompt_chars
        if chars > limit:
            raise APIError(400, f"{param}: {chars:,} characters cannot fit this model's context of "
                                f"{self.predictor.context_length} tokens (at most {limit:,} characters)",
                           param=param, code="context_length_exceeded")

    def sampling(self, body, counts, default_max, extra_stop=(), logprobs=None):
        """generate() keywords for this request, after checking the limits (counts: tokens of each prompt);
        `logprobs` (the number of alternatives, 0 or more) adds the engine's log probabilities."""
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: up to 4 non-empty sequences", param="stop")
        room = self.predictor.context_length - max(counts)
        limit = self.options.max_tokens
        if body.max_tokens is not None and body.max_tokens > limit:
            raise APIError(400, f"max_tokens: at most {limit} on this server, got {body.max_tokens}", param="max_tokens")
        wanted = body.max_tokens if body.max_tokens is not None else min(limit, default_max or limit, room)
        if wanted > room:
            raise APIError(400, f"this model's context is {self.predictor.context_length} tokens; the prompt has "
                                f"{max(counts)} and max_tokens asks for {wanted} more", param="max_tokens",
                           code="context_length_exceeded")
        if wanted < 1:
            raise APIError(400, f"the prompt ({max(counts)} tokens) fills the model's context "
                                f"({self.predictor.context_length})", param="messages", code="context_length_exceeded")
        # a temperature this small is greedy decoding already; dividing logits by it would overflow to inf
        temperature = body.temperature if body.temperature >= 1e-3 else 0.0
        sampling = {"max_new_tokens": wanted, "temperature": temperature, "top_k": body.top_k,
                    "top_p": body.top_p, "repetition_penalty": body.repetition_penalty,
                    "stop": tuple(stop) + tuple(extra_stop), "seed": body.seed}
        if logprobs is not None:
            if self.engine is None:  # only the continuous-batching engine scores its tokens
                raise APIError(400, f"logprobs: log probabilities are not returned for a {self.predictor.kind} run",
                               param="logprobs", code="unsupported_parameter")
            sampling["logprobs"] = logprobs
        return sampling

    def usage(self, prompt_tokens, completion_tokens):
        from danlu.serve.schemas import Usage

        self.metrics.add_tokens(prompt_tokens, completion_tokens)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def stream(self, prompt, sampling, object_name, prompt_tokens, stream_options, deadline, echo=None, prompt_chars=0):
        """Server-sent events of one streamed completion, decoded in the engine's batch (or step by step in the
        model thread, without an engine). `echo`: text sent before the completion; `prompt_chars`: where the
        completion's text offsets start (legacy logprobs)."""
        if self.streams + self.depth >= self.options.max_queue:
            raise APIError(503, "server overloaded: too many requests in flight", code="overloaded",
                           headers={"Retry-After": "1"})
        if self.engine is not None:
            return self._engine_events(prompt, sampling, object_name, prompt_tokens, stream_options, deadline, echo,
                                       prompt_chars)
        return self._events(prompt, sampling, object_name, prompt_tokens, stream_options, deadline, echo)

    def _chunker(self, object_name):
        chat = object_name == "chat.completion.chunk"
        ident, created, model = _new_id("chatcmpl" if chat else "cmpl"), int(time.time()), self.predictor.name

        def chunk(delta, finish=None, logprobs=None):
            if chat:
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": logprobs}
            return _sse({"id": ident, "object": object_name, "created": created, "model": model, "choices": [choice]})

        def usage(value):
            return _sse({"id": ident, "object": object_name, "created": created, "model": model, "choices": [],
                         "usage": value.model_dump()})

        return chat, chunk, usage

    async def _engine_events(self, prompt, sampling, object_name, prompt_tokens, stream_options, deadline, echo,
                             prompt_chars=0):
        from danlu.serve import schemas as s
        from danlu.serve.engine import Request as Generation

        loop = asyncio.get_running_loop()
        chat, chunk, usage_event = self._chunker(object_name)
        events = asyncio.Queue()
        request = Generation(prompt, dict(sampling), _queue_emitter(self.outbox, loop, events), stream=True)
        scored = None  # the logprobs of the next delta
        self.streams += 1  # counted here, not before: a generator that never starts never ends either
        try:
            self.engine.submit(request)
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            elif echo is not None:
                yield chunk(echo)
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield _sse(error_body(f"the stream did not finish within {self.options.timeout_s:g} s",
                                          "server_error", code="timeout"))
                    break
                if kind == "logprobs":  # the tokens of the delta that follows
                    scored = s.chat_logprobs(value) if chat else s.completion_logprobs(value, prompt_chars)
                    continue
                if kind == "delta":
                    if value:
                        yield chunk({"content": value} if chat else value,
                                    logprobs=scored.model_dump() if scored is not None else None)
                    scored = None
                    continue
                if kind == "error":
                    raise value
                _, used, finish, _ = value
                yield chunk({} if chat else "", finish)
                usage = self.usage(prompt_tokens, used)
                if stream_options is not None and stream_options.include_usage:
                    yield usage_event(usage)
                break
            yield "data: [DONE]\n\n"
        except Overloaded:
            yield _sse(error_body("server overloaded: the request queue is full", "server_error", code="overloaded"))
            yield "data: [DONE]\n\n"
        except Exception:
            yield _stream_failed()
        finally:
            self.streams -= 1
            request.cancelled.set()  # a client gone, or a timeout: the row leaves the batch

    async def _events(self, prompt, sampling, object_name, prompt_tokens, stream_options, deadline, echo):
        loop = asyncio.get_running_loop()
        chat, chunk, usage_event = self._chunker(object_name)
        it, done = None, False
        self.streams += 1  # counted here, not before: a generator that never starts never ends either
        try:
            it = await loop.run_in_executor(self.executor, lambda: self.predictor.stream(prompt, **sampling))
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            elif echo is not None:
                yield chunk(echo)
            while True:
                if time.monotonic() > deadline:
                    yield _sse(error_body(f"the stream did not finish within {self.options.timeout_s:g} s",
                                          "server_error", code="timeout"))
                    break
                delta = await loop.run_in_executor(self.executor, next, it, _END)
                if delta is _END:
                    done = True
                    break
                if delta:
                    yield chunk({"content": delta} if chat else delta)
            if done:
                used, finish = it.result()
                yield chunk({} if chat else "", finish)
                usage = self.usage(prompt_tokens, used)
                if stream_options is not None and stream_options.include_usage:
                    yield usage_event(usage)
            yield "data: [DONE]\n\n"
        except Exception:
            yield _stream_failed()
        finally:
            self.streams -= 1
            if it is not None and not done:  # queued behind any step still running in the model thread
                self.executor.submit(_close, it)

    # -- small things -----------------------------------------------------------------------------
    def check_model(self, name, param="model"):
        if name != self.predictor.name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves `{self.predictor.name}`",
                           param=param, code="model_not_found")

    def card(self):
        from danlu.serve.schemas import ModelCard

        return ModelCard(id=self.predictor.name, created=self.predictor.created)

    def playground_html(self):
        if self._html is None:
            page = resources.files("danlu.serve").joinpath("playground.html").read_text(encoding="utf-8")
            from danlu.sampling import CHAT_SAMPLING  # the playground chats as `danlu chat` does

            config = {**self.predictor.describe(), "auth": bool(self.options.api_key),
                      "max_tokens": self.options.max_tokens,
                      "sampling": {k: getattr(CHAT_SAMPLING, k) for k in ("max_new_tokens", "temperature", "top_k",
                                                                          "top_p", "repetition_penalty")}}
            blob = json.dumps(config, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            self._html = page.replace(PLAYGROUND_PLACEHOLDER, blob)
        return self._html


_END = object()


class Job(list):
    """One request's [(prompt, sampling)] for the generation batcher, with the flag that cancels it."""

    def __init__(self, items):
        super().__init__(items)
        self.cancelled = threading.Event()


class _Outbox:
    """What the engine's thread hands to event loops, one call per loop and decoding step however many rows
    the step answered (streams' tokens, finished completions): each call wakes the loop, which then holds
    Python's lock while the model thread waits for it."""

    def __init__(self):
        self._lock, self._calls = threading.Lock(), {}

    def put(self, loop, fn, *args):
        """Queue `fn(*args)` for `loop` (in the engine's thread)."""
        with self._lock:
            self._calls.setdefault(loop, []).append((fn, args))

    def flush(self):
        """Hand what was queued to the loops (the engine calls it after each step)."""
        with self._lock:
            calls, self._calls = self._calls, {}
        for loop, queued in calls.items():
            try:
                loop.call_soon_threadsafe(_call_all, queued)
            except RuntimeError:  # the event loop is closed: nobody waits any more
                pass


def _call_all(calls):
    for fn, args in calls:
        fn(*args)


def _emitter(outbox, loop, future):
    """The engine's emit for a plain completion: the final result (or error) settles `future` in the loop."""
    def settle(kind, value):
        if future.done():
            return
        if kind == "done":
            future.set_result(value)
        elif kind == "error":
            future.set_exception(value)

    def emit(kind, value):
        if kind != "delta":
            outbox.put(loop, settle, kind, value)

    return emit


def _queue_emitter(outbox, loop, events):
    """The engine's emit for a stream: every event goes to the `events` queue in the loop."""
    def emit(kind, value):
        outbox.put(loop, events.put_nowait, (kind, value))

    return emit


def _stream_failed():
    """The last events of a stream that failed: an error chunk (the details go to the server log) and [DONE]."""
    log.exception("stream failed")
    return _sse(error_body("internal server error; the server log has the details", "server_error",
                           code="internal_error")) + "data: [DONE]\n\n"


def _cancel(future, payload):
    future.cancel()  # drops it from the queue if its batch has not started
    if isinstance(payload, Job):
        payload.cancelled.set()  # stops its generation at the next decoding step


async def _disconnect(receive):
    """Returns once the client has disconnected (the body was read already: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def body_problem(content_type, body):
    """(status, message, code) of a body that is not a UTF-8 JSON object sent as application/json, else None."""
    kind = content_type.split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        shown = f"`{kind}`" if kind else "none"
        return 415, f"Content-Type must be application/json (got {shown})", "unsupported_media_type"
    if not body.strip():
        return 400, "the request body is empty; send a JSON object", "invalid_json"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return 400, f"the request body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r})", "invalid_utf8"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return 400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", "invalid_json"
    if not isinstance(value, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")
        return 400, f"the request body must be a JSON object, got a JSON {kind}", "invalid_json"
    return None


def _close(it):
    try:
        it.close()
    except Exception:  # a generator that fails while closing has nothing left to tell the client
        log.debug("closing a stream failed", exc_info=True)


def _sampling_key(sampling):
    if sampling.get("seed") is not None:  # seeded requests run alone: their text must not depend on neighbours
        return object()
    return tuple(sorted(sampling.items()))


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _content(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _field_path(loc):
    """The request's field names of a pydantic error location, without "body" and the union members' tags
    (`str`, `function-after[...]`) that pydantic inserts."""
    path = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none")):
            break
        path.append(str(part))
    return path


def _not_found_message(path, classifier):
    if classifier and path in ("/v1/chat/completions", "/v1/completions"):
        return f"{path}: this server runs a classifier; POST /v1/predict with {{\"texts\": [...]}}"
    if not classifier and path == "/v1/predict":
        return f"{path}: this server runs a language model; use /v1/chat/completions or /v1/completions"
    return f"{path}: no such route"


def _route_templates(app):
    return sorted({r.path for r in app.routes if hasattr(r, "path")}, key=len, reverse=True)
