"""ASGI middleware of the app: plain classes, so that they run before FastAPI reads (or parses) a body.

GuardMiddleware checks the Host header, the API key on /v1 routes (in constant time) and the body size,
answering 400 / 401 / 413 in OpenAI's error shape itself; MetricsMiddleware counts every answer,
including the guard's, by route template, method and status, with its latency; LeanPredictMiddleware
answers valid /v1/predict requests without FastAPI's per-request machinery.
"""
import asyncio
import hmac
import json
import logging
import time

from danlu.serve.metrics import Metrics

log = logging.getLogger("danlu.serve")
CLIENT_CLOSED = 499  # status counted for a request whose client left before it was answered


def error_body(message, type="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}



async def send_json(send, status, body, headers=None):
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()  # as Starlette's JSONResponse
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    """Host check, API key on /v1 routes (constant-time compare), and the body size limit."""

    def __init__(self, app, options):
        self.app, self.options = app, options
        self.key = options.api_key.encode() if options.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), v)
        if self.options.allowed_hosts is not None:
            host = headers.get("host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.options.allowed_hosts:
                return await send_json(send, 400, error_body("unknown Host header", code="invalid_host"))
        if self.key is not None and scope["path"].startswith("/v1"):
            given = headers.get("authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = "missing API key: send Authorization: Bearer KEY" if not given else "invalid API key"
                return await send_json(send, 401, error_body(message, "authentication_error", code="invalid_api_key"),
                                        {"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            limit = self.options.max_body_bytes
            try:
                declared = int(headers.get("content-length", b"0") or 0)
            except ValueError:
                return await send_json(send, 400, error_body("invalid Content-Length", code="invalid_header"))
            if declared > limit:
                return await send_json(send, 413, error_body(f"request body larger than {limit} bytes",
                                                              code="body_too_large"))
            body, more = [], True
            size = 0
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                body.append(message.get("body", b""))
                size += len(body[-1])
                more = message.get("more_body", False)
                if size > limit:
                    return await send_json(send, 413, error_body(f"request body larger than {limit} bytes",
                                                                  code="body_too_large"))
            receive = _replay(b"".join(body), receive)
        return await self.app(scope, receive, send)


def _replay(body, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class MetricsMiddleware:
    """Counts every answer by route template, method and status, with its latency."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics = app, metrics
        self.exact = {r for r in routes if "{" not in r}
        self.prefixes = [r.split("{", 1)[0] for r in routes if "{" in r]
        self.templates = {r.split("{", 1)[0]: r for r in routes if "{" in r}

    def route(self, path):
        if path in self.exact:
            return path
        for prefix in self.prefixes:
            if path.startswith(prefix) and "/" not in path[len(prefix):]:
                return self.templates[prefix]
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), None

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        except asyncio.CancelledError:  # the server dropped the request (its client left, or shutdown)
            status = status or CLIENT_CLOSED
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            # nothing sent: the client left before an answer (nginx's 499), not a server error
            self.metrics.observe_request(self.route(scope["path"]), scope["method"], status or CLIENT_CLOSED,
                                         time.perf_counter() - started)


def predict_upload(scope):
    """(Content-Type header, its media type lower-cased) of a POST /v1/predict, b"" when absent;
    (None, None) for any other request."""
    if scope["type"] != "http" or scope["path"] != "/v1/predict" or scope["method"] != "POST":
        return None, None
    content_type = next((v for k, v in scope["headers"] if k.lower() == b"content-type"), b"")
    return content_type, content_type.split(b";")[0].strip().lower()


class LeanPredictMiddleware:
    """POST /v1/predict's valid requests, answered without FastAPI's request machinery.

    Routing, dependency solving, content-type sniffing, the Request / Response objects and FastAPI's own
    middleware cost ~5x the handler itself, and on a busy server that time is taken from the model thread
    (one GIL). The app's chain is MetricsMiddleware(GuardMiddleware(this(FastAPI))); here the body is
    validated by the same pydantic model and answered by the same handler (`answer`). Any other request,
    and one that does not validate or is not plain JSON, goes on to FastAPI unchanged (`app`), so every
    error message and the OpenAPI schema stay FastAPI's. APIErrors get the app's error shape.
    """

    def __init__(self, app, validate, answer, api_error):
        self.app, self.validate, self.answer, self.api_error = app, validate, answer, api_error

    async def __call__(self, scope, receive, send):
        content_type, media_type = predict_upload(scope)
        if content_type is None:
            return await self.app(scope, receive, send)
        message = await receive()  # GuardMiddleware has read the whole body: one message
        body = message.get("body", b"")
        request = None
        if media_type == b"application/json" and not message.get("more_body"):
            try:
                request = self.validate(body)
            except ValueError:  # pydantic's ValidationError: FastAPI words the answer
                request = None
        if request is None:
            return await self.app(scope, _replay(body, receive), send)
        try:
            payload = await self.answer(request)
        except self.api_error as e:
            return await send_json(send, e.status, error_body(e.message, e.type, e.param, e.code), e.headers)
        except Exception:  # as the app's handler: logged here, a generic 500 for the client
            log.exception("internal error on POST /v1/predict")
            return await send_json(send, 500, error_body("internal server error; the server log has the details",
                                                          "server_error", code="internal_error"), {"Connection": "close"})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
