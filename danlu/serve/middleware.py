"""ASGI middleware of the app: plain classes, so that they run before FastAPI reads (or parses) a body.

GuardMiddleware checks the Host header, the API key on /v1 routes (in constant time) and the body size,
answering 400 / 401 / 413 in OpenAI's error shape itself; MetricsMiddleware counts every answer,
including the guard's, by route template, method and status, with its latency.
"""
import hmac
import json
import time

from danlu.serve.metrics import Metrics


def error_body(message, type="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}



async def _send_json(send, status, body, headers=None):
    payload = json.dumps(body).encode()
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
                return await _send_json(send, 400, error_body("unknown Host header", code="invalid_host"))
        if self.key is not None and scope["path"].startswith("/v1"):
            given = headers.get("authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = "missing API key: send Authorization: Bearer KEY" if not given else "invalid API key"
                return await _send_json(send, 401, error_body(message, "authentication_error", code="invalid_api_key"),
                                        {"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            limit = self.options.max_body_bytes
            try:
                declared = int(headers.get("content-length", b"0") or 0)
            except ValueError:
                return await _send_json(send, 400, error_body("invalid Content-Length", code="invalid_header"))
            if declared > limit:
                return await _send_json(send, 413, error_body(f"request body larger than {limit} bytes",
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
                    return await _send_json(send, 413, error_body(f"request body larger than {limit} bytes",
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
        started, status = time.perf_counter(), 500

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.observe_request(self.route(scope["path"]), scope["method"], status,
                                         time.perf_counter() - started)
