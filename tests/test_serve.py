"""The inspector server: SSE schema and values, bad input, concurrency, disconnects, start-up errors."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import math

import httpx
import pytest
import torch

from pocketlm.cli import main
from pocketlm.serve.app import create_app


def test_inspect_stream_schema_and_values(server_url, tiny_model, inspect):
    model, tok = tiny_model
    events = inspect(server_url, {"messages": [{"role": "user", "content": "Name three colours."}],
                                  "max_tokens": 20, "temperature": 0.9, "seed": 4, "top_alternatives": 5,
                                  "logit_lens": True, "attn_entropy": True})
    names = [e for e, _ in events]
    assert names[0] == "prefill" and names[-1] == "done" and set(names[1:-1]) == {"token"}
    prefill, tokens, done = events[0][1], [d for e, d in events if e == "token"], events[-1][1]
    assert all(d["v"] == 1 for _, d in events)
    prompt = [t["id"] for t in prefill["tokens"]]
    assert prompt[-1] == tok.asst_id and prefill["cache_len"] == prefill["n_tokens"] == len(prompt)
    assert done["new_tokens"] == len(tokens) and done["finish_reason"] in ("eot", "length")
    # The cache grows by exactly one per step, starting from the prompt.
    assert [t["cache_len"] for t in tokens] == list(range(len(prompt), len(prompt) + len(tokens)))
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    # Streamed logprobs and entropies equal one plain forward pass over prompt + generated tokens.
    ids = prompt + [t["id"] for t in tokens]
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]))
    logp = torch.log_softmax(logits[0, len(prompt) - 1:-1], dim=-1)
    assert [t["logprob"] for t in tokens] == pytest.approx(logp.gather(1, torch.tensor(ids[len(prompt):])[:, None])[:, 0].tolist(), abs=1e-4)
    assert [t["entropy"] for t in tokens] == pytest.approx((-(logp.exp() * logp).sum(-1)).tolist(), abs=1e-4)
    for t in tokens:
        assert t["prob"] == pytest.approx(math.exp(t["logprob"]))
        assert len(t["top"]) == 5 and t["top"][0]["prob"] >= t["top"][-1]["prob"]
        assert bytes(t["bytes"]) == tok.id_to_bytes(t["id"]) and "\ufffd" not in t["text"]
        assert len(t["lens"]) == model.cfg.n_layer and len(t["lens"][0]) == 3
        assert len(t["attn_entropy"]) == model.cfg.n_layer and len(t["attn_entropy"][0]) == model.cfg.n_head
        assert t["ms"] > 0 and t["cache_bytes"] > 0
    visible = [t for t in tokens if t["id"] != tok.eot_id]
    assert done["text"] == "".join(t["text"] for t in visible) == tok.decode([t["id"] for t in visible])


def test_inspect_raw_prompt_without_signals(server_url, inspect):
    events = inspect(server_url, {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
    tokens = [d for e, d in events if e == "token"]
    assert len(tokens) == 4 and events[-1][1]["finish_reason"] == "length"
    assert "lens" not in tokens[0] and "attn_entropy" not in tokens[0]


LONG = "word " * 400
BAD = [
    ("/v1/chat/completions", "{not json", "body"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ("/api/inspect", {"prompt": "hi", "logit_lense": True}, "logit_lense"),
    ("/api/inspect", {"prompt": LONG}, "prompt"),
    ("/api/inspect", {"prompt": ""}, "prompt"),
    ("/api/inspect", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "body"),
    ("/api/inspect", {"prompt": "hi", "top_alternatives": 500}, "top_alternatives"),
]


@pytest.mark.parametrize("path, body, param", BAD)
def test_bad_input_is_a_400_naming_the_field(server_url, path, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server_url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_cancel_unknown_request_is_404(server_url):
    r = httpx.post(f"{server_url}/api/inspect/gen-unknown/cancel", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["param"] == "job_id"


def test_concurrent_requests_match_sequential(server_url, complete):
    seeds = list(range(100, 116))
    one_by_one = [complete(server_url, s) for s in seeds]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda s: complete(server_url, s), seeds))
    assert [r["content"] for r in together] == [r["content"] for r in one_by_one]
    assert [r["finish"] for r in together] == [r["finish"] for r in one_by_one]
    for a, b in zip(together, one_by_one):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
    assert len({r["content"] for r in one_by_one}) > 8  # different seeds really gave different replies


def _only_job(app):
    (job,) = app.state.engine.jobs.values()
    return job


def test_client_disconnect_stops_generation(metered_server, sse, wait_idle):
    with metered_server() as (url, app, permits, _):
        permits.release(4)  # the prefill and three decode steps
        with httpx.stream("POST", f"{url}/api/inspect", json={"prompt": "The river", "max_tokens": 100},
                          timeout=30) as r:
            got = [e for e, _ in sse(r, limit=5)]
            job = _only_job(app)
        assert got == ["prefill", "token", "token", "token", "token"]
        assert job.cancel.wait(30)  # the server saw the client leave
        permits.release(10**6)
        info = wait_idle(url)
        assert info["finished"] == {"cancelled": 1}
        # Stopped at the latest after the forward that may already have been waiting for its permit.
        assert app.state.forwards["forwards"] in (4, 5)


def test_cancel_endpoint_ends_stream_with_cancelled(metered_server, sse):
    with metered_server() as (url, _, permits, _):
        permits.release(1)  # the prefill
        with httpx.stream("POST", f"{url}/api/inspect", json={"prompt": "The river", "max_tokens": 100},
                          timeout=30) as r:
            events = []
            for event, data in sse(r):
                events.append((event, data))
                if event == "prefill":
                    assert httpx.post(f"{url}/api/inspect/{data['request_id']}/cancel", timeout=10).json()["cancelled"]
                    permits.release(10**6)
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "cancelled"
    # Stopped before the step after the cancel: at the latest the one already waiting to run.
    assert events[-1][1]["new_tokens"] in (1, 2)


def test_too_many_generations_get_429(metered_server, sse, wait_idle):
    with metered_server(max_active=1) as (url, _, permits, _):
        permits.release(1)
        with httpx.stream("POST", f"{url}/api/inspect", json={"prompt": "The river", "max_tokens": 60},
                          timeout=30) as r:
            assert next(sse(r))[0] == "prefill"  # the first generation is running, waiting for its next permit
            second = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                                json={"messages": [{"role": "user", "content": "hi"}]})
        assert second.status_code == 429 and second.json()["error"]["type"] == "rate_limit_error"
        permits.release(10**6)
        wait_idle(url)
        assert httpx.post(f"{url}/api/inspect", json={"prompt": "The", "max_tokens": 2}, timeout=30).status_code == 200


def test_failing_generation_sends_error_event(tiny_model, live_server, inspect):
    model, tok = tiny_model
    broken = copy.deepcopy(model)

    def fail_on_decode(_module, args, _out):
        if args[0].shape[1] == 1:
            raise RuntimeError("boom")

    broken.register_forward_hook(fail_on_decode)
    with live_server(create_app(broken, tok)) as url:
        events = inspect(url, {"prompt": "The river", "max_tokens": 10})
        finished = httpx.get(f"{url}/api/info", timeout=10).json()["finished"]
    assert [e for e, _ in events] == ["prefill", "token", "error"]
    assert events[-1][1] == {"v": 1, "message": "RuntimeError: boom"}
    assert finished == {"error": 1}


def test_serve_bad_checkpoint_fails_at_start(tmp_path, capsys):
    assert main(["serve", "--ckpt", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pocketlm: error: model folder") and "missing" in err and err.count("\n") == 1


def test_static_page_is_served(server_url):
    page = httpx.get(server_url + "/", timeout=10)
    assert page.status_code == 200 and "pocketlm inspector" in page.text
    js = httpx.get(server_url + "/static/app.js", timeout=10)
    assert js.status_code == 200 and "/api/inspect" in js.text
