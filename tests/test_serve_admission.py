"""The server under bursts and departures: atomic admission, disconnects stop non-streaming work,
seeds checked, failed streams end properly, trailing assistant messages continued."""

from __future__ import annotations

import copy
import json
import socket
from collections import Counter

import httpx
import pytest

from pocketlm.serve.app import create_app
from pocketlm.tokenizer.chat_template import format_chat_tokens


def _post_bytes(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode() + data


def _status(s: socket.socket) -> int:
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = s.recv(1)
        assert chunk, "the server closed the connection before answering"
        line += chunk
    return int(line.split()[1])


def test_burst_admits_exactly_max_active(metered_server, wait_idle):
    """32 streams at once against --max-active 2: exactly 2 run, 30 get a 429 without waiting."""
    with metered_server(max_active=2) as (url, _, permits, _):
        port = int(url.rsplit(":", 1)[1])
        socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(32)]
        try:
            request = _post_bytes("/api/inspect", {"prompt": "The river", "max_tokens": 50})
            for s in socks:  # connected first, then all 32 requests sent back to back
                s.sendall(request)
            # With no permits no generation can finish and free a slot, so every answer here was
            # decided by admission alone.
            statuses = Counter(_status(s) for s in socks)
            info = httpx.get(f"{url}/api/info", timeout=10).json()
        finally:
            for s in socks:
                s.close()
            permits.release(10**6)
        assert statuses == {200: 2, 429: 30}
        assert info["active"] == 2
        assert wait_idle(url)["active"] == 0


def test_non_streaming_client_that_leaves_stops_its_generation(metered_server, wait_idle):
    with metered_server(max_active=1) as (url, app, permits, started):
        port = int(url.rsplit(":", 1)[1])
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 100}
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(_post_bytes("/v1/chat/completions", body))
            assert started.wait(30)  # the generation is running (its prefill waits for a permit)
            job = next(iter(app.state.engine.jobs.values()))
        assert job.cancel.wait(30)  # the server saw the client leave
        permits.release(10**6)
        info = wait_idle(url)
        assert info["finished"] == {"cancelled": 1}
        assert app.state.forwards["forwards"] == 1  # the prefill that was already waiting; nothing after it
        # Its slot is free again (max_active is 1).
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2}, timeout=30)
        assert r.status_code == 200


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
@pytest.mark.parametrize("path, extra", [("/v1/chat/completions", {}), ("/v1/chat/completions", {"stream": True}),
                                         ("/api/inspect", {})])
def test_seed_out_of_range_is_a_400_naming_seed(server_url, path, extra, seed):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": seed, **extra}
    r = httpx.post(server_url + path, json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_seed_extremes_are_accepted(server_url):
    for seed in (2**64 - 1, -(2**63), 0):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": seed}
        assert httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=30).status_code == 200


@pytest.mark.parametrize("setting", ["temperature", "top_p"])
def test_tiny_temperature_or_top_p_is_greedy_not_a_500(server_url, setting):
    """Found by the schema fuzz: 4e-172 made logits / temperature overflow to inf, and top_p round to 0."""
    body = {"messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 8}
    greedy = httpx.post(f"{server_url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=30)
    tiny = httpx.post(f"{server_url}/v1/chat/completions", json={**body, setting: 4e-172}, timeout=30)
    assert tiny.status_code == 200
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


def test_failure_inside_a_chat_stream_ends_with_error_chunk_and_done(tiny_model, live_server, suppress_eot, wait_idle):
    model, tok = tiny_model
    broken = copy.deepcopy(model)
    suppress_eot(broken, tok.eot_id)  # a reply that ended at its first token would never reach a decode step

    def fail_on_decode(_module, args, _out):
        if args[0].shape[1] == 1:
            raise RuntimeError("boom")

    broken.register_forward_hook(fail_on_decode)
    with live_server(create_app(broken, tok)) as url:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        plain = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert wait_idle(url)["active"] == 0
    assert data[-1] == "[DONE]"
    err = json.loads(data[-2])["error"]
    assert err["message"] == "RuntimeError: boom" and err["type"] == "server_error"
    # Not streaming: a JSON 500 (the server's fault, not the client's), never a plain-text page.
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"


def test_trailing_assistant_message_is_continued(server_url, tiny_model, inspect):
    _, tok = tiny_model
    messages = [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The longest river is"}]
    events = inspect(server_url, {"messages": messages, "max_tokens": 3, "temperature": 0})
    prompt = [t["id"] for t in events[0][1]["tokens"]]
    # The assistant's words without their closing <|eot|>: the reply carries on from them.
    assert prompt == format_chat_tokens(tok, messages)[:-1] and prompt[-1] != tok.eot_id
    r = httpx.post(f"{server_url}/v1/chat/completions", json={"messages": messages, "max_tokens": 3,
                                                               "temperature": 0}, timeout=30)
    assert r.json()["usage"]["prompt_tokens"] == len(prompt)


def test_fit_context_drops_oldest_turns(server_url, tiny_model, inspect):
    model, _ = tiny_model
    words = "one two three four five six seven eight nine ten " * 2
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"{i} {words}"}, {"role": "assistant", "content": words}]
    messages.append({"role": "user", "content": "last"})
    body = {"messages": messages, "max_tokens": 16, "temperature": 0}
    too_long = httpx.post(f"{server_url}/api/inspect", json=body, timeout=30)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "messages"
    events = inspect(server_url, {**body, "fit_context": True})
    prefill = events[0][1]
    assert prefill["n_tokens"] <= model.cfg.block_size - 16
    assert prefill["dropped"] > 0 and prefill["dropped"] % 2 == 0  # whole exchanges
    assert events[-1][0] == "done"
