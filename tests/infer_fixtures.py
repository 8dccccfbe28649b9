"""Fixtures for the inference and serving tests: a tiny model trained in seconds, and live servers.

Import the fixtures into a test module (`from infer_fixtures import tiny_ckpt, ...`, together with
the fixtures they depend on); the model is trained once per test run however many modules use it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

TRAIN_STEPS = 250
BATCH, SEQ = 8, 64


def _chats(data: Path, n: int) -> Iterator[list[dict]]:
    """Dolly records as two-turn chats: the model learns the template and to end turns with <|eot|>."""
    with (data / "dolly" / "dolly_15k_from_docx.jsonl").open(encoding="utf-8") as f:
        for _, line in zip(range(n), f):
            rec = json.loads(line)
            user = rec["instruction"] + (f"\n\n{rec['context']}" if rec["context"] else "")
            yield [{"role": "user", "content": user}, {"role": "assistant", "content": rec["response"]}]


def train_tiny(tok, data: Path, out_dir: Path, steps: int = TRAIN_STEPS) -> Path:
    """Train GPTConfig.tiny on real chats for `steps` AdamW steps (a few seconds on CPU) and save it."""
    from pocketlm.model.config import GPTConfig
    from pocketlm.model.gpt_v1 import GPT
    from pocketlm.model.io import save_model
    from pocketlm.tokenizer.chat_template import render_chat

    torch.manual_seed(0)
    stream = torch.tensor([i for chat in _chats(data, 800) for i in render_chat(tok, chat)[0]])
    model = GPT(GPTConfig.tiny(vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    # One thread: on a small shared CPU, two threads on ops this small spend their time contending.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - SEQ - 1, (BATCH,), generator=gen)
        rows = torch.stack([stream[s:s + SEQ + 1] for s in starts.tolist()])
        _, loss = model(rows[:, :-1], rows[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return save_model(out_dir, model, tok.path, {"train_steps": steps, "final_loss": loss.item()})


# pytest makes a separate session fixture for every module that imports one, so the training is
# memoised here: once per tokenizer per test run.
_TRAINED: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_ckpt(small_tokenizer, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if small_tokenizer.hash not in _TRAINED:
        out = tmp_path_factory.mktemp("tiny_ckpt") / "model"
        _TRAINED[small_tokenizer.hash] = train_tiny(small_tokenizer, shared_data, out)
    return _TRAINED[small_tokenizer.hash]


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt: Path):
    """(model, tok) loaded from the checkpoint on CPU, fp32."""
    from pocketlm.model.io import load_model

    model, tok, _ = load_model(tiny_ckpt, "cpu")
    return model, tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` under uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def server_url(tiny_model) -> Iterator[str]:
    """A live server around the tiny model, shared by the HTTP and browser tests."""
    from pocketlm.serve.app import create_app

    model, tok = tiny_model
    with live_server(create_app(model, tok, model_id="tiny")) as url:
        yield url


@contextmanager
def forced_tokens(model, ids: list[int]) -> Iterator[None]:
    """Make the k-th forward of each generation (the prefill is the 0th) predict `ids[k]` overwhelmingly
    (the last id from then on).

    Done with a forward hook that adds a large bias to the last position's logits, so everything
    downstream (sampling, logprobs, detokenization) runs on real model outputs.
    """
    calls = {"n": 0}

    def hook(_module, _args, out):
        logits, loss = out
        if logits.shape[1] > 1:  # a prefill starts a new generation (test prompts are > 1 token)
            calls["n"] = 0
        k = min(calls["n"], len(ids) - 1)
        calls["n"] += 1
        logits = logits.clone()
        logits[:, -1, ids[k]] += 1e4
        return logits, loss

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def suppress_eot(model, eot_id: int, delay_s: float = 0.0) -> dict:
    """Hook the model so it never ends its turn (and sleeps `delay_s` per forward); returns a dict whose
    "forwards" counts its forwards. Cached and uncached runs see the same change, so they stay comparable."""
    counter = {"forwards": 0}

    def hook(_module, _args, out):
        counter["forwards"] += 1
        time.sleep(delay_s)
        logits, loss = out
        logits[..., eot_id] = -1e4
        return logits, loss

    model.register_forward_hook(hook)
    return counter


@pytest.fixture(scope="session")
def slow_server(tiny_model) -> Iterator[tuple[str, dict]]:
    """A server whose model takes 30 ms per forward and never ends its turn, for stopping generations
    midway. Yields (url, counter): counter["forwards"] counts the model's forwards.
    """
    import copy

    from pocketlm.serve.app import create_app

    model, tok = tiny_model
    slow = copy.deepcopy(model)
    counter = suppress_eot(slow, tok.eot_id, delay_s=0.03)
    with live_server(create_app(slow, tok, model_id="tiny-slow")) as url:
        yield url, counter
