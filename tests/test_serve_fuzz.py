"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis, in-process over ASGI): valid and
invalid requests alike never get a 5xx, and every error is the JSON error shape naming the field.
Then over a real keep-alive connection, with strings drawn from all of Unicode (lone surrogates
included, which schemathesis' JSON strings never hold): no 5xx, and the connection still answers."""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


# Every code point, the surrogates (category Cs) included (`characters()` leaves them out by default)
# and drawn often: 2,048 of 1.1 million code points would otherwise hardly ever come up.
# (A list joined, not st.text: text() merges the alternatives into one alphabet, weighted by size.)
TEXT = st.lists(st.characters(codec=None, exclude_categories=()) | st.characters(categories=["Cs"]),
                max_size=24).map("".join)
ROLE = st.sampled_from(["system", "user", "assistant", "user", "assistant"]) | TEXT
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLE, "content": TEXT}), min_size=1, max_size=3)
EXTRA = st.dictionaries(TEXT, TEXT | st.integers() | st.none(), max_size=2)  # keys the API ignores or refuses


def _with(extra: dict, body: dict) -> dict:
    return {**extra, **body}


BODIES = st.one_of(
    st.builds(lambda m, model, x: ("/v1/chat/completions", _with(x, {"messages": m, "max_tokens": 1, "model": model})),
              MESSAGES, TEXT, EXTRA),
    st.builds(lambda m, fit, x: ("/api/inspect", _with(x, {"messages": m, "max_tokens": 1, "fit_context": fit})),
              MESSAGES, st.booleans(), EXTRA),
    st.builds(lambda p, x: ("/api/inspect", _with(x, {"prompt": p, "max_tokens": 1})), TEXT, EXTRA),
    st.builds(lambda job: (f"/api/inspect/{quote(job.encode('utf-8', 'surrogatepass'), safe='')}/cancel", None),
              TEXT),
)


def test_any_unicode_in_any_field_is_never_a_5xx_and_keeps_the_connection(server_url):
    port = int(server_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    # Bounded for CI: 80 requests, each generating at most one token.
    @given(request=BODIES, raw_utf8=st.booleans())
    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(request, raw_utf8):
        path, body = request
        if body is None:
            data = b""
        elif raw_utf8:  # surrogates written as (invalid) UTF-8 bytes, as a careless client might
            data = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
        else:  # surrogates as \\udXXX escapes, as json.dumps and curl send them
            data = json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"content-type": "application/json"})
        r = conn.getresponse()
        answer = r.read()
        assert r.status < 500, (path, data[:300], answer[:300])
        if r.status >= 400:
            error = json.loads(answer)["error"]
            assert error["message"] and error["type"] in ("invalid_request_error", "rate_limit_error")
            if r.status == 400:
                assert isinstance(error["param"], str) and error["param"], error
        sock = conn.sock
        assert sock is not None, "the server closed the connection"
        conn.request("GET", "/api/info")
        info = conn.getresponse()
        assert info.status == 200 and json.loads(info.read())["model"]
        assert conn.sock is sock  # the same connection answered: it is still usable

    try:
        run()
    finally:
        conn.close()
