"""Schemathesis over the served OpenAPI spec: generated valid and invalid requests never get a 5xx, and every
answer matches the documented status codes, content types and schemas. Bounded: a few examples per operation.
"""
import pytest
import torch

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from danlu.serve.app import ServeOptions, create_app
from danlu.serve.predictor import Predictor
from danlu.serve.server import ServerThread
from danlu.testing import classifier_run, language_model_run

torch.set_num_threads(1)
KEY = "schema-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    return {"classifier": classifier_run(str(root / "cls"), kind="mlp"),
            "language_model": language_model_run(str(root / "lm"), steps=20)}


@pytest.mark.parametrize("kind", ["classifier", "language_model"])
def test_generated_requests_get_no_server_error(runs, kind):
    options = ServeOptions(api_key=KEY, max_tokens=8, max_body_bytes=64 * 1024, timeout_s=30)
    with ServerThread(create_app(Predictor(runs[kind]), options)) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        labels = {op.label for op in operations}
        expected = {"GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{model_id}"}
        expected |= {"POST /v1/predict"} if kind == "classifier" else {"POST /v1/completions", "POST /v1/chat/completions"}
        assert labels == expected
        calls = {"count": 0, "statuses": {}}
        def call(case):
            response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            calls["count"] += 1
            calls["statuses"].setdefault(case.operation.label, set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            case.validate_response(response, checks=CHECKS)

        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                check = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                                 suppress_health_check=list(HealthCheck))(
                    given(case=operation.as_strategy(generation_mode=mode))(call))
                try:
                    check()
                except Unsatisfiable:  # no invalid request exists for an operation without inputs
                    assert mode == GenerationMode.NEGATIVE and operation.method == "get"
        assert calls["count"] >= len(operations) * 4
        for label, statuses in calls["statuses"].items():  # valid requests were answered, not only refused
            assert 200 in statuses, (label, statuses)
        for label in expected - {"GET /health", "GET /metrics", "GET /v1/models"}:
            assert calls["statuses"][label] & {400, 404}, (label, calls["statuses"][label])
