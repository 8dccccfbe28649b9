"""Fitting a chat into the context (`fit_context`, `pocketlm chat`): the same drops as the plain
re-render-and-drop loop, linear in the number of messages, a cap on messages per request, and a
request whose client leaves while its history is fitted gives its slot back at once."""

from __future__ import annotations

import json
import random
import socket

import httpx
import pytest

from pocketlm import PocketLMError
from pocketlm.infer.chat import chat_prompt_ids, fit_messages
from pocketlm.serve.app import create_app


def reference_fit(tok, messages, limit):
    """The straightforward loop (render all, drop the oldest exchange, render again): quadratic, but
    plainly right; fit_messages must give exactly its answers."""
    messages = list(messages)
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    dropped = 0
    while True:
        ids = chat_prompt_ids(tok, messages)
        if len(ids) <= limit:
            return ids, dropped
        if len(messages) - n_system <= 1:
            raise PocketLMError(f"too long: {len(ids)}")
        cut = n_system + 1
        while cut < len(messages) - 1 and messages[cut]["role"] == "assistant":
            cut += 1
        dropped += cut - n_system
        del messages[n_system:cut]


def _texts(data_dir) -> list[str]:
    with (data_dir / "dolly" / "dolly_15k_from_docx.jsonl").open(encoding="utf-8") as f:
        recs = [json.loads(line) for _, line in zip(range(60), f)]
    return [t for r in recs for t in (r["instruction"], r["response"][:300])]


def test_fit_messages_drops_exactly_what_the_plain_loop_drops(small_tokenizer, data_dir):
    tok, texts = small_tokenizer, _texts(data_dir)
    rng = random.Random(0)
    checked = errors = 0
    for _ in range(150):
        n = rng.randint(1, 14)
        roles = [rng.choice(["user", "assistant", "user", "system"]) for _ in range(n)]
        if rng.random() < 0.5:
            roles = ["system"] * rng.randint(1, 2) + roles
        messages = [{"role": r, "content": rng.choice(texts)[:rng.randint(0, 200)]} for r in roles]
        limit = rng.randint(5, 300)
        try:
            want = reference_fit(tok, messages, limit)
        except PocketLMError as e:
            with pytest.raises(PocketLMError, match=r"the message is (\d+) tokens") as got:
                fit_messages(tok, messages, limit)
            assert str(e).split(": ")[1] == got.value.args[0].split()[3]  # the same length reported
            errors += 1
            continue
        assert fit_messages(tok, messages, limit) == want
        checked += 1
    assert checked > 50 and errors > 10  # both outcomes were exercised


class CountingTokenizer:
    """The real tokenizer, counting encode calls; past `budget` calls it stops the test (a quadratic
    fit of thousands of messages would take minutes)."""

    def __init__(self, tok, budget: int) -> None:
        self._tok, self.calls, self.budget = tok, 0, budget

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, *args, **kwargs):
        self.calls += 1
        assert self.calls <= self.budget, f"more than {self.budget} encode calls"
        return self._tok.encode(text, *args, **kwargs)


@pytest.mark.parametrize("system", [False, True])
def test_fit_messages_is_linear_in_the_number_of_messages(small_tokenizer, system):
    def calls(n: int) -> int:
        head = [{"role": "system", "content": "Be brief."}] if system else []
        messages = head + [{"role": "user" if i % 2 == 0 else "assistant", "content": f"hi {i}"} for i in range(n)]
        counting = CountingTokenizer(small_tokenizer, budget=10 * n)
        ids, dropped = fit_messages(counting, messages, 100)
        assert len(ids) <= 100 and dropped > 0.9 * n
        return counting.calls

    small, big = calls(1000), calls(4000)
    assert big <= 4.2 * small, (small, big)
    assert big <= 2 * 4000 + 10  # each message tokenized about once


def test_too_many_messages_is_a_400_naming_the_limit(server_url, tiny_model, live_server):
    many = [{"role": "user", "content": "hi"}] * 1025  # the default limit is 1024
    for path in ("/v1/chat/completions", "/api/inspect"):
        r = httpx.post(server_url + path, json={"messages": many, "max_tokens": 1, "fit_context": True}
                       if path == "/api/inspect" else {"messages": many, "max_tokens": 1}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "1024" in r.json()["error"]["message"] and "--max-messages" in r.json()["error"]["message"]
    model, tok = tiny_model
    with live_server(create_app(model, tok, max_messages=3)) as url:
        body = {"messages": [{"role": "user", "content": "hi"}] * 3, "max_tokens": 1, "fit_context": True}
        assert httpx.post(f"{url}/api/inspect", json=body, timeout=30).status_code == 200
        r = httpx.post(f"{url}/api/inspect", json={**body, "messages": body["messages"] * 2}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("path", ["/api/inspect", "/v1/chat/completions"])
def test_client_that_leaves_while_its_chat_is_fitted_frees_its_slot(tiny_model, live_server, wait_idle, path,
                                                                   blocking_tokenizer):
    model, tok = tiny_model
    blocking = blocking_tokenizer(tok)
    app = create_app(model, blocking, max_active=1)
    messages = [{"role": "user", "content": "BLOCK"}] + [{"role": "user", "content": f"hi {i}"} for i in range(50)]
    body = {"messages": messages, "max_tokens": 4, **({"fit_context": True} if path == "/api/inspect" else {})}
    data = json.dumps(body).encode()
    with live_server(app) as url:
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(data)}\r\n\r\n".encode() + data)
                assert blocking.entered.wait(30)  # its history is being tokenized, holding the only slot
                (job,) = app.state.engine.jobs.values()
            # The client has gone; its tokenizing is still stuck, yet the slot comes back within a second.
            assert job.cancel.wait(1), "the slot was not given back when the client left"
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 2}, timeout=30)
            assert r.status_code == 200
        finally:
            blocking.release.set()
        info = wait_idle(url)
    assert sum(info["finished"].values()) == 1  # the abandoned request never generated
