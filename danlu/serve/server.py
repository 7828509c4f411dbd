"""Running the app: `serve()` for `danlu serve`, `ServerThread` for notebooks, tests and benchmarks.

Both bind the socket themselves, so `port=0` picks a free port and the real address is known
before the first request. Loopback (127.0.0.1) is the default; any other address must be asked for.

>>> with ServerThread(create_app(Predictor.from_run("runs/seed_lstm"))) as url:   # doctest: +SKIP
...     httpx.post(url + "/v1/predict", json={"texts": ["质量很好"]}).json()
"""
from __future__ import annotations

import gc
import ipaddress
import socket
import sys
import threading

from danlu.serve.app import LOOPBACK_HOSTS, ServeOptions, create_app
from danlu.serve.predictor import Predictor

SWITCH_INTERVAL_S = 0.0005  # how long a thread keeps Python's lock when another waits for it (sys.setswitchinterval)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host, port):
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
    # a response written in two pieces (headers, body) waits ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        from danlu.registry import ConfigError

        raise ConfigError(f"serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, access_log, log_level="info"):
    import uvicorn

    # on SIGTERM, requests in flight get a few seconds to finish, then the server stops regardless
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, server_header=False,
                            timeout_keep_alive=5, lifespan="on", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(run, host="127.0.0.1", port=8000, api_key=None, device="cpu", access_log=True, threads=0, precision="fp32",
          **options):
    """Load a run and serve it until interrupted (the `danlu serve` verb)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        from danlu.registry import ConfigError

        raise ConfigError(f"danlu serve needs the serve extra: pip install 'danlu[serve]' ({e.name} is missing)") from None
    if threads:
        import torch

        torch.set_num_threads(threads)
    # the limits first: a server that would refuse every request (--max-queue 0) stops before loading the model
    opts = ServeOptions(api_key=api_key or None, allowed_hosts=LOOPBACK_HOSTS if is_loopback(host) else None,
                        **options)
    predictor = Predictor.from_run(run, device=device, precision=precision)
    app = create_app(predictor, opts)
    # torch, the model and the app are ~200,000 objects that live as long as the server: frozen, the
    # garbage collector stops walking them. Otherwise each full collection stalls the event loop for
    # ~0.1 s, and under load (a few thousand requests a second) there is one every second or so.
    gc.collect()
    gc.freeze()
    # The model thread makes many short torch calls, each of which lets go of Python's lock; while the event
    # loop is busy, taking it back waits up to the switch interval every time (5 ms by default), so a decoding
    # step stretched to several times its length under load. Measured with the client of benchmarks/serve.py
    # (16 clients, 10% streams, 3 rounds alternating): 0.5 ms gave 1.2-3x the throughput of the default and
    # streams' p50 of 94-164 ms against 257-348 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    sock = bind(host, port)
    shown = sock.getsockname()
    url = f"http://{'[' + shown[0] + ']' if ':' in shown[0] else shown[0]}:{shown[1]}"
    auth = "API key required on /v1" if opts.api_key else "no API key"
    print(f"danlu serve: {predictor.kind} `{predictor.name}` on {url}/ ({auth}; playground at {url}/)",
          file=sys.stderr, flush=True)
    if not is_loopback(host) and not opts.api_key:
        print("danlu serve: warning: listening beyond this machine without an API key (--api-key or DANLU_API_KEY)",
              file=sys.stderr, flush=True)
    _uvicorn_server(app, access_log).run(sockets=[sock])


class ServerThread:
    """A real uvicorn server in a background thread; `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host="127.0.0.1", port=0, log_level="warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server = self.thread = self.url = None

    def start(self, timeout=30.0):
        sock = bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self.server = _uvicorn_server(self.app, access_log=False, log_level=self.log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name=f"danlu-serve-{self.port}")
        self.thread.start()
        ready = threading.Event()
        while not self.server.started and self.thread.is_alive():
            ready.wait(0.01)
            timeout -= 0.01
            if timeout <= 0:
                raise TimeoutError(f"the server on {self.url} did not start")
        if not self.server.started:
            raise RuntimeError(f"the server on {self.url} failed to start")
        return self.url

    def stop(self):
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
