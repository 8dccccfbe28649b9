"""The server against a hostile web page and oversized input: Host and Origin checks, unguessable ids,
nothing loaded from outside the machine, body limits, CPU work off the event loop, no paths in ids."""

from __future__ import annotations

import re
import threading

import httpx
import pytest

from pocketlm.serve.app import STATIC, create_app

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_foreign_host_is_refused(server_url):
    r = httpx.get(f"{server_url}/api/info", headers={"host": "evil.example"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "host"
    assert "--allow-host" in r.json()["error"]["message"]
    port = server_url.rsplit(":", 1)[1]
    for name in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST"):
        assert httpx.get(f"{server_url}/api/info", headers={"host": f"{name}:{port}"}, timeout=10).status_code == 200
    r = httpx.post(f"{server_url}/v1/chat/completions", json=CHAT, headers={"host": "evil.example:80"}, timeout=10)
    assert r.status_code == 400


def test_allowed_hosts_come_from_host_and_allow_list(tiny_model, live_server):
    from pocketlm.serve.guard import LOOPBACK_HOSTS, GuardConfig, allowed_hosts

    assert allowed_hosts("0.0.0.0", []) == LOOPBACK_HOSTS
    assert allowed_hosts("10.0.0.5", ["lab.local:8000"]) == LOOPBACK_HOSTS + ("10.0.0.5", "lab.local")
    model, tok = tiny_model
    guard = GuardConfig(allowed_hosts("0.0.0.0", ["lab.local"]))
    with live_server(create_app(model, tok, guard=guard)) as url:
        assert httpx.get(f"{url}/api/info", headers={"host": "lab.local"}, timeout=10).status_code == 200
        assert httpx.get(f"{url}/api/info", headers={"host": "other.local"}, timeout=10).status_code == 400


def test_cross_origin_requests_cannot_change_state(metered_server):
    with metered_server() as (url, _, permits, _):
        permits.release(1)  # the prefill; the generation then waits, still running
        with httpx.stream("POST", f"{url}/api/inspect", json={"prompt": "The river", "max_tokens": 60},
                          timeout=30) as r:
            events = r.iter_lines()
            first = next(line for line in events if line.startswith("data:"))
            job_id = re.search(r'"request_id": "([^"]+)"', first).group(1)
            for origin in ("https://evil.example", "null", f"{url}.evil.example"):
                r2 = httpx.post(f"{url}/api/inspect/{job_id}/cancel", headers={"origin": origin}, timeout=10)
                assert r2.status_code == 403 and r2.json()["error"]["param"] == "origin"
            assert httpx.post(f"{url}/api/inspect", json={"prompt": "x"}, headers={"origin": "https://evil.example"},
                              timeout=10).status_code == 403
            # The page's own origin may stop it.
            assert httpx.post(f"{url}/api/inspect/{job_id}/cancel", headers={"origin": url},
                              timeout=10).json()["cancelled"]
            permits.release(10**6)
            tail = [line for line in events if line.startswith("data:")]
        assert '"finish_reason": "cancelled"' in tail[-1]


def test_request_ids_are_unguessable(server_url):
    ids = []
    for _ in range(2):
        with httpx.stream("POST", f"{server_url}/api/inspect", json={"prompt": "The", "max_tokens": 1}, timeout=30) as r:
            line = next(line for line in r.iter_lines() if line.startswith("data:"))
            ids.append(re.search(r'"request_id": "([^"]+)"', line).group(1))
    assert all(re.fullmatch(r"gen-[A-Za-z0-9_-]{20,}", i) for i in ids), ids
    assert ids[0] != ids[1]


def test_nothing_is_loaded_from_outside_the_machine(server_url):
    assert httpx.get(f"{server_url}/docs", timeout=10).status_code == 404
    assert httpx.get(f"{server_url}/redoc", timeout=10).status_code == 404
    assert httpx.get(f"{server_url}/openapi.json", timeout=10).status_code == 200
    pages = [httpx.get(f"{server_url}/", timeout=10).text] + [p.read_text() for p in STATIC.iterdir()]
    for text in pages:
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, urls


def test_body_over_the_limit_is_413_naming_the_limit(tiny_model, live_server):
    from pocketlm.serve.guard import GuardConfig

    model, tok = tiny_model
    with live_server(create_app(model, tok, guard=GuardConfig(max_body_bytes=2000))) as url:
        big = {"messages": [{"role": "user", "content": "x" * 3000}]}
        for path in ("/v1/chat/completions", "/api/inspect"):
            r = httpx.post(url + path, json=big, timeout=10)
            assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
            assert r.json()["error"]["param"] == "body"

        def chunks():  # no Content-Length: the limit still holds while reading
            for _ in range(4):
                yield b"x" * 1000

        r = httpx.post(url + "/api/inspect", content=chunks(), headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 413
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_tokenizing_does_not_block_other_requests(tiny_model, live_server, blocking_tokenizer):
    model, tok = tiny_model
    blocking = blocking_tokenizer(tok)
    with live_server(create_app(model, blocking)) as url:
        result = {}
        body = {"messages": [{"role": "user", "content": "BLOCK"}], "max_tokens": 2}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)))
        t.start()
        try:
            assert blocking.entered.wait(30)
            # While that request is being tokenized, the event loop still answers everyone else.
            info = httpx.get(f"{url}/api/info", timeout=10)
            assert info.status_code == 200 and info.json()["active"] == 1
        finally:
            blocking.release.set()
            t.join(60)
        assert result["r"].status_code == 200


def test_model_id_is_the_run_name_not_a_path():
    from pocketlm.serve.cli import model_name

    assert model_name("/home/me/runs/mine/sft/best") == "mine-sft-best"
    assert model_name("runs/mine/pretrain/last/") == "mine-pretrain-last"
    assert model_name("/data/exported-model") == "exported-model"
    assert model_name("./hf") == "hf"


def test_favicon(server_url):
    r = httpx.get(f"{server_url}/favicon.ico", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert 'rel="icon"' in httpx.get(f"{server_url}/", timeout=10).text


@pytest.mark.parametrize("path", ["/nope", "/v1/nope"])
def test_unknown_paths_are_json_errors(server_url, path):
    r = httpx.get(server_url + path, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]
