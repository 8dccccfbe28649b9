"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis, in-process over ASGI): valid and
invalid requests alike never get a 5xx, and every error is the JSON error shape naming the field."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from pocketlm.serve.app import create_app
from pocketlm.serve.guard import LOOPBACK_HOSTS, GuardConfig

ASGI_HOST = "testserver"  # the name schemathesis' in-process client sends as Host


@pytest.fixture(scope="module")
def api_schema(tiny_model):
    model, tok = tiny_model
    app = create_app(model, tok, guard=GuardConfig(allowed_hosts=LOOPBACK_HOSTS + (ASGI_HOST,)))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def check_response(case, response) -> None:
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"] in ("invalid_request_error", "rate_limit_error")
        if response.status_code in (400, 413):  # the client's input was at fault: which part of it
            assert isinstance(error["param"], str) and error["param"], error


OPERATIONS = ["GET /api/info", "GET /v1/models", "POST /v1/chat/completions", "POST /api/inspect",
              "POST /api/inspect/{job_id}/cancel"]


CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    # Negative cases need something to break: a body (the GETs have none; any job_id string is valid).
    (op, GenerationMode.NEGATIVE) for op in ("POST /v1/chat/completions", "POST /api/inspect")]


@pytest.mark.parametrize("operation, mode", CASES)
def test_api_never_fails_and_names_the_field(api_schema, operation, mode):
    method, path = operation.split()
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)

    # Bounded for CI: 20 requests per operation and mode, each generation at most one 128-token context.
    @given(case=strategy)
    @settings(max_examples=20, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        check_response(case, case.call())

    run()


def test_schema_lists_every_operation(api_schema):
    listed = {f"{op.ok().method.upper()} {op.ok().path}" for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)
