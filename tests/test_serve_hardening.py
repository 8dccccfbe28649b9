"""The server as a local web app must be: text that is not text refused by field, keep-alive connections
that survive a refused request, security headers on every response, Retry-After on 429, a strict Host
parser, HEAD on the page, and `pocketlm serve` itself (no banner, read deadlines, one-line port errors)."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import pocketlm
from pocketlm.serve.app import create_app

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SECURITY = {"content-security-policy": "default-src 'self'; frame-ancestors 'none'", "x-frame-options": "DENY",
            "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# --- D1: lone surrogates ------------------------------------------------------------------------------

SURROGATE_CASES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 2},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\udfff"}]},
     "messages.1.content"),
    ("/v1/chat/completions", {**CHAT, "model": "\udc80"}, "model"),
    ("/v1/chat/completions", {**CHAT, "user": "\ud800"}, "user"),  # a field the server ignores: still not text
    ("/api/inspect", {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}, "messages.0.content"),
    ("/api/inspect", {"prompt": "Once \udbff", "max_tokens": 2}, "prompt"),
    ("/api/inspect", {"messages": [{"role": "user\ud800", "content": "hi"}]}, "messages.0.role"),
    ("/api/inspect", {"prompt": "hi", "\ud800": 1}, "\\ud800"),  # a key: named with the code point escaped
]


@pytest.mark.parametrize("path, body, param", SURROGATE_CASES)
def test_lone_surrogate_is_a_400_naming_the_field_and_the_connection_stays_usable(server_url, path, body, param):
    data = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a "\udXXX" escape, as curl sends it
    assert b"\\ud" in data
    conn = http.client.HTTPConnection("127.0.0.1", _port(server_url), timeout=30)
    try:
        conn.request("POST", path, body=data, headers={"content-type": "application/json"})
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
        sock = conn.sock
        assert r.status == 400, err
        assert err["param"] == param and "surrogate" in err["message"]
        # The same connection (not a new one) answers the next request.
        conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT).encode(),
                     headers={"content-type": "application/json"})
        r2 = conn.getresponse()
        assert r2.status == 200 and json.loads(r2.read())["choices"]
        assert conn.sock is sock
    finally:
        conn.close()


def test_surrogate_written_as_utf8_bytes_is_a_400_too(server_url):
    """Found by the fuzz: json.loads lets a surrogate encoded as (invalid) UTF-8 bytes through as well."""
    data = '{"messages": [{"role": "user", "content": "x\ud88b"}]}'.encode("utf-8", "surrogatepass")
    r = httpx.post(f"{server_url}/v1/chat/completions", content=data, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


def test_paired_surrogates_are_text(server_url):
    # Two escapes that make one character (U+1F600) when JSON is decoded: not refused.
    data = b'{"messages": [{"role": "user", "content": "a smile \\ud83d\\ude00"}], "max_tokens": 2}'
    r = httpx.post(f"{server_url}/v1/chat/completions", content=data, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 200, r.text


# --- H1: security headers on every response -----------------------------------------------------------

ROUTES = [  # (method, path, request kwargs, expected status)
    ("GET", "/", {}, 200),
    ("HEAD", "/", {}, 200),
    ("GET", "/static/app.js", {}, 200),
    ("GET", "/static/style.css", {}, 200),
    ("GET", "/static/nope.js", {}, 404),
    ("GET", "/favicon.ico", {}, 200),
    ("GET", "/openapi.json", {}, 200),
    ("GET", "/api/info", {}, 200),
    ("GET", "/v1/models", {}, 200),
    ("POST", "/v1/chat/completions", {"json": CHAT}, 200),
    ("POST", "/v1/chat/completions", {"json": {**CHAT, "stream": True}}, 200),
    ("POST", "/api/inspect", {"json": {"prompt": "The", "max_tokens": 2}}, 200),
    ("POST", "/api/inspect", {"json": {"prompt": ""}}, 400),
    ("POST", "/api/inspect", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ("POST", "/api/inspect/gen-nope/cancel", {}, 404),
    ("GET", "/nope", {}, 404),
    ("DELETE", "/api/info", {}, 405),
    ("GET", "/v1/chat/completions", {}, 405),
    ("GET", "/api/info", {"headers": {"host": "evil.example"}}, 400),
    ("POST", "/api/inspect", {"json": {"prompt": "x"}, "headers": {"origin": "https://evil.example"}}, 403),
    ("POST", "/api/inspect", {"content": b"x" * 1_000_001}, 413),
]


@pytest.mark.parametrize("method, path, kwargs, status", ROUTES, ids=[f"{m} {p} {s}" for m, p, _, s in ROUTES])
def test_every_response_carries_the_security_headers(server_url, method, path, kwargs, status):
    r = httpx.request(method, server_url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text[:200]
    for name, value in SECURITY.items():
        assert r.headers.get(name) == value, (name, dict(r.headers))


def test_a_server_error_carries_the_security_headers_too(tiny_model, live_server):
    model, tok = tiny_model
    app = create_app(model, tok)

    @app.get("/api/broken")  # a route added later, with a bug: the guard still wraps its 500
    async def broken():
        raise RuntimeError("boom")

    with live_server(app) as url:
        r = httpx.get(f"{url}/api/broken", timeout=10)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    for name, value in SECURITY.items():
        assert r.headers.get(name) == value, name


def test_head_of_the_page_is_200_with_no_body(server_url):
    r = httpx.head(server_url + "/", timeout=10)
    assert r.status_code == 200 and r.content == b"" and r.headers["content-type"].startswith("text/html")
    assert int(r.headers["content-length"]) == len(httpx.get(server_url + "/", timeout=10).content)


def test_page_has_no_inline_script_or_style():
    from pocketlm.serve.app import STATIC

    page = (STATIC / "index.html").read_text()
    assert "<script>" not in page and "style=" not in page and "<style" not in page and " on" + "click=" not in page


# --- H3: Retry-After ----------------------------------------------------------------------------------

def test_429_says_when_to_retry(metered_server, sse):
    with metered_server(max_active=1) as (url, _, permits, _):
        permits.release(1)
        with httpx.stream("POST", f"{url}/api/inspect", json={"prompt": "The river", "max_tokens": 60},
                          timeout=30) as r:
            assert next(sse(r))[0] == "prefill"
            second = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
            permits.release(10**6)
    assert second.status_code == 429
    assert int(second.headers["retry-after"]) >= 1


# --- H4: Host parsed strictly -------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["[::1].evil.com", "[::1]evil", "localhost:{port}@evil.com", "localhost:{port}:1",
                                  "[::1", "localhost:{port}x", "127.0.0.1:{port}/x", "[fe80::1%eth0]",
                                  "[evil.com]"])
def test_host_that_is_not_an_authority_is_refused(server_url, host):
    port = _port(server_url)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # raw: clients tidy Host values up
        s.sendall(f"GET /api/info HTTP/1.1\r\nHost: {host.format(port=port)}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 400 Bad Request", answer[:200]
    assert b'"param": "host"' in answer


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:{port}", "127.0.0.1:{port}", "[::1]:{port}",
                                  "[0:0:0:0:0:0:0:1]", "localhost:"])
def test_loopback_authorities_are_accepted(server_url, host):
    r = httpx.get(f"{server_url}/api/info", headers={"host": host.format(port=_port(server_url))}, timeout=10)
    assert r.status_code == 200


# --- `pocketlm serve` itself: banner, deadlines, port errors (as a user runs it) ----------------------

def _serve_cmd(ckpt: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pocketlm", "serve", "--ckpt", str(ckpt), "--device", "cpu", *args]


def _env() -> dict:
    # The pocketlm the tests import (a worktree or landed main), not whatever is installed.
    return {**os.environ, "PYTHONPATH": str(Path(pocketlm.__file__).resolve().parents[1])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cli_server(tiny_ckpt):
    """`pocketlm serve` in a subprocess with 1-second read deadlines and idle timeout."""
    port = _free_port()
    proc = subprocess.Popen(_serve_cmd(tiny_ckpt, "--port", str(port), "--header-timeout", "1", "--body-timeout",
                                       "1", "--keepalive-timeout", "1"),
                            stderr=subprocess.PIPE, text=True, env=_env())
    lines = []
    try:
        for line in proc.stderr:  # until uvicorn says it is up (or the process ends)
            lines.append(line)
            if "Application startup complete" in line:
                break
        assert proc.poll() is None, "".join(lines)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_server_sends_no_banner(cli_server):
    r = httpx.get(cli_server + "/api/info", timeout=10)
    assert r.status_code == 200 and "server" not in r.headers
    assert r.headers["x-frame-options"] == "DENY"


def _closed_while_dribbling(port: int, head: bytes, dribble: bytes, limit_s: float = 15) -> bytes:
    """Send `head`, then `dribble` one byte every 0.2 s; what the server sent once it closed the
    connection. Fails if the whole dribble went through (the server never gave up on it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as s:
        s.sendall(head)
        got = b""
        for i in range(len(dribble)):
            readable, _, _ = select.select([s], [], [], 0.2)
            if readable:
                while chunk := s.recv(4096):
                    got += chunk
                return got
            try:
                s.sendall(dribble[i:i + 1])
            except OSError:  # closed while sending
                return got
    raise AssertionError(f"the server kept reading a client that sent {len(dribble)} bytes one at a time")


def test_slow_clients_are_cut_off_and_others_are_not(cli_server):
    port = _port(cli_server)
    # Headers sent one byte every 0.2 s: 60 bytes would take 12 s; the deadline is 1 s.
    answer = _closed_while_dribbling(port, b"GET /api/info HTTP/1.1\r\n", b"X-Pad: " + b"a" * 60 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 408") and b'"param": "headers"' in answer, answer[:300]
    # A body promised 60 bytes long, sent one byte every 0.2 s.
    head = (b"POST /api/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: 60\r\n\r\n")
    answer = _closed_while_dribbling(port, head, b"x" * 60)
    assert answer.startswith(b"HTTP/1.1 408") and b'"param": "body"' in answer, answer[:300]
    assert b"x-frame-options: DENY" in answer
    # A connection that sends nothing, and one idle after its answer, are closed.
    with socket.create_connection(("127.0.0.1", port), timeout=15) as idle:
        assert idle.recv(1) == b""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", "/api/info")
    assert conn.getresponse().read()
    assert conn.sock.recv(1) == b""  # closed by the server while idle
    conn.close()
    # Meanwhile and afterwards, an ordinary client is served.
    assert httpx.post(cli_server + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_bad_port_is_one_line(tiny_ckpt, port):
    p = subprocess.run(_serve_cmd(tiny_ckpt, "--port", port), capture_output=True, text=True, env=_env(), timeout=60)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert "--port" in p.stderr and "1-65535" in p.stderr, p.stderr


def test_port_in_use_is_one_line_suggesting_port(tiny_ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(_serve_cmd(tiny_ckpt, "--port", str(port)), capture_output=True, text=True, env=_env(),
                           timeout=60)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"port {port}" in p.stderr and "in use" in p.stderr and "--port" in p.stderr, p.stderr
