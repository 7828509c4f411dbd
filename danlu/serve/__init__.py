"""Deployment: serve a run over HTTP (danlu serve) and export it to ONNX (danlu export).

    predictor.py   Predictor.from_run(dir): classify / complete / stream, no HTTP in sight
    batching.py    MicroBatcher: bounded queue, batches of N items or T ms, model in one thread
    engine.py      Engine: continuous batching of generation, one KV-cache row per request
    app.py         create_app(predictor, ServeOptions): FastAPI routes, errors, limits, streams
    middleware.py  Host check, API key, body size limit; request metrics (plain ASGI)
    schemas.py     request / response bodies (OpenAI's schema for completions)
    metrics.py     Prometheus text exposition
    server.py      serve() for the CLI; ServerThread for notebooks, tests and benchmarks
    export.py      export_onnx(run, out): ONNX graph + parity and latency check; OnnxModel to use it
    playground.html  the page at `/`

FastAPI, uvicorn and onnx are imported inside the functions that need them (extras `serve`, `export`).
"""
