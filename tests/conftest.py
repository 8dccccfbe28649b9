"""Shared test fixtures and helpers.

Data: the tests read `tests/data/` (the `data_dir` fixture), short real slices of every source laid
out as a local mirror, so a fresh clone runs its tests with nothing beside it. The few tests that need
the whole mirror (`../shared/data` beside the clone, or POCKETLM_SHARED_DATA) are marked `full_data`:
they are skipped with a reason when it is absent, and fail instead when POCKETLM_REQUIRE_FULL_DATA=1
(CI sets it, so they still run there).

Inference and serving: a tiny model trained in seconds on dolly chats (`tiny_ckpt`, `tiny_model`),
live servers around it (`live_server`, `metered_server`), helpers that steer its outputs
(`forced_tokens`, `suppress_eot`) and read its replies (`sse`, `inspect`, `complete`, `wait_idle`).

Export clients: the chats the export tests send (`export_chats`, `reply_tokens`), pocketlm's own greedy
reply (`pocketlm_reply`) and `need_client`, which skips when a client is missing, or fails in CI.

Helpers shared by several test files are fixtures here (each returns the helper), so no test file
imports from another.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DATA = Path(__file__).resolve().parent / "data"
SHARED_DATA = Path(os.environ.get("POCKETLM_SHARED_DATA", REPO.parent / "shared" / "data"))
REQUIRE_FULL_DATA = "POCKETLM_REQUIRE_FULL_DATA"


# --- data -------------------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "full_data: needs the whole data mirror (../shared/data or "
                                       "POCKETLM_SHARED_DATA); skipped without it")


def _need_full_data() -> None:
    """Skip (or, under POCKETLM_REQUIRE_FULL_DATA=1, fail) when the full mirror is not there."""
    if (SHARED_DATA / "README.md").is_file():
        return
    why = f"full data mirror not found at {SHARED_DATA} (put shared/data beside the clone or set POCKETLM_SHARED_DATA)"
    if os.environ.get(REQUIRE_FULL_DATA) == "1":
        pytest.fail(f"{why}; {REQUIRE_FULL_DATA}=1 requires it")
    pytest.skip(why)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("full_data"):
        _need_full_data()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The fixture corpus in tests/data, laid out as a local mirror (one folder per source)."""
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The whole mirror; tests that use it are marked full_data."""
    _need_full_data()
    return SHARED_DATA


class DataSet(NamedTuple):
    """A data folder and which one it is, for tests that run on the fixture corpus and the full mirror."""

    name: str  # "fixture" | "full"
    path: Path


@pytest.fixture(params=[pytest.param("fixture"), pytest.param("full", marks=pytest.mark.full_data)])
def data_set(request: pytest.FixtureRequest) -> DataSet:
    """Runs a test on tests/data and, marked full_data, on the whole mirror; it looks up its
    expected numbers by `data_set.name`."""
    return DataSet(request.param, FIXTURE_DATA if request.param == "fixture" else SHARED_DATA)


def _small_corpus(data: Path) -> Iterator[str]:
    """All the fixture's FineWeb documents, the Tom Sawyer excerpt and the dolly records (~150 KB)."""
    with (data / "fineweb_legal" / "fineweb_legal_pilot_shared.jsonl").open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
    yield (data / "gutenberg" / "74-0.txt").read_text(encoding="utf-8-sig")
    with (data / "dolly" / "dolly_15k_from_docx.jsonl").open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            yield from (rec[k] for k in ("instruction", "context", "response") if rec[k])


@pytest.fixture(scope="session")
def small_tokenizer(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2000-piece unigram tokenizer (same lossless settings and special ids as v1), trained in seconds."""
    from pocketlm.tokenizer.tokenizer_sp import Tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("small_tokenizer")
    return Tokenizer.load(train_tokenizer(_small_corpus(data_dir), vocab_size=2000, out_dir=out, seed=0))


@pytest.fixture(scope="session")
def small_cache(small_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`small_cache(specs, data)`: a token cache of `small_tokenizer` over (source spec, kind) pairs read
    from the mirror at `data`, one encoding thread, 10% validation."""
    from pocketlm.cache.build_cache import build_cache

    def build(specs: list[tuple[str, str]], data: Path) -> Path:
        out = tmp_path_factory.mktemp("cache") / "cache"
        build_cache(small_tokenizer.path, specs, out, data_dir=data, workers=1, val_fraction=0.1, progress=False)
        return out

    return build


@pytest.fixture(scope="session")
def small_corpus() -> Callable[[Path], Iterator[str]]:
    """`small_corpus(data)`: the texts `small_tokenizer` is trained on."""
    return _small_corpus


# --- a tiny trained model ---------------------------------------------------------------------------

TRAIN_STEPS = 250
BATCH, SEQ = 8, 64


def _chats(data: Path) -> Iterator[list[dict]]:
    """Dolly records as two-turn chats: the model learns the template and to end turns with <|eot|>."""
    with (data / "dolly" / "dolly_15k_from_docx.jsonl").open(encoding="utf-8") as f:
        for line in f:
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
    stream = torch.tensor([i for chat in _chats(data) for i in render_chat(tok, chat)[0]])
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


@pytest.fixture(scope="session")
def tiny_ckpt(small_tokenizer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(small_tokenizer, data_dir, tmp_path_factory.mktemp("tiny_ckpt") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt: Path):
    """(model, tok) loaded from the checkpoint on CPU, fp32."""
    from pocketlm.model.io import load_model

    model, tok, _ = load_model(tiny_ckpt, "cpu")
    return model, tok


@contextmanager
def _forced_tokens(model, ids: list[int]) -> Iterator[None]:
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


def _suppress_eot(model, eot_id: int, delay_s: float = 0.0) -> dict:
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
def forced_tokens():
    """`with forced_tokens(model, ids):` the model's outputs follow `ids` (see `_forced_tokens`)."""
    return _forced_tokens


@pytest.fixture(scope="session")
def suppress_eot():
    """`suppress_eot(model, eot_id, delay_s=0.0)`: the model never ends its turn (see `_suppress_eot`)."""
    return _suppress_eot


# --- live servers -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _live_server(app) -> Iterator[str]:
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


class BlockingTokenizer:
    """The real tokenizer, except that encoding text containing "BLOCK" waits for `release`."""

    def __init__(self, tok) -> None:
        self._tok, self.entered, self.release = tok, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text: str, *args, **kwargs):
        if "BLOCK" in text:
            self.entered.set()
            assert self.release.wait(30), "the test never released the tokenizer"
        return self._tok.encode(text, *args, **kwargs)


@pytest.fixture(scope="session")
def blocking_tokenizer():
    """`blocking_tokenizer(tok)`: `tok`, except that encoding text with "BLOCK" in it waits for the
    test's `.release` (`.entered` is set when it starts waiting)."""
    return BlockingTokenizer


@pytest.fixture(scope="session")
def live_server():
    """`with live_server(app) as url:` runs `app` under uvicorn for the block."""
    return _live_server


@pytest.fixture(scope="session")
def server_url(tiny_model) -> Iterator[str]:
    """A live server around the tiny model, shared by the HTTP and browser tests."""
    from pocketlm.serve.app import create_app

    model, tok = tiny_model
    with _live_server(create_app(model, tok, model_id="tiny")) as url:
        yield url


@pytest.fixture(scope="session")
def slow_server(tiny_model) -> Iterator[tuple[str, dict]]:
    """A server whose model takes 30 ms per forward and never ends its turn, for stopping generations
    midway. Yields (url, counter): counter["forwards"] counts the model's forwards.
    """
    from pocketlm.serve.app import create_app

    model, tok = tiny_model
    slow = copy.deepcopy(model)
    counter = _suppress_eot(slow, tok.eot_id, delay_s=0.03)
    with _live_server(create_app(slow, tok, model_id="tiny-slow")) as url:
        yield url, counter


@pytest.fixture(scope="session")
def metered_server(tiny_model):
    """`with metered_server(max_active=64) as (url, app, permits, started):` a server whose model never
    ends its turn and runs each forward only on a permit from the test, so tests wait on events, not on
    timing. `permits` is a semaphore (release(n) lets n forwards run), `started` is set when the first
    forward is asked for; `app.state.forwards["forwards"]` counts the forwards."""
    from pocketlm.serve.app import create_app

    @contextmanager
    def serve(max_active: int = 64) -> Iterator[tuple]:
        model, tok = tiny_model
        metered = copy.deepcopy(model)
        counter = _suppress_eot(metered, tok.eot_id)
        permits, started = threading.Semaphore(0), threading.Event()

        def take_permit(_module, _args):
            started.set()
            assert permits.acquire(timeout=60), "the test never let this forward run"

        metered.register_forward_pre_hook(take_permit)
        app = create_app(metered, tok, max_active=max_active)
        app.state.forwards = counter
        with _live_server(app) as url:
            try:
                yield url, app, permits, started
            finally:
                permits.release(10**6)  # let any generation still waiting run out

    return serve


def _sse(response, limit: int = 1000) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of an SSE response; at most `limit` events."""
    event = None
    n = 0
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, json.loads(line[5:].strip())
            n += 1
            if n >= limit:
                return


@pytest.fixture(scope="session")
def sse():
    """`sse(response, limit=1000)`: the (event, data) pairs of an httpx SSE response."""
    return _sse


@pytest.fixture(scope="session")
def inspect():
    """`inspect(url, body)`: all (event, data) pairs of one /api/inspect stream (asserts a 200)."""
    import httpx

    def run(url: str, body: dict) -> list[tuple[str, dict]]:
        with httpx.stream("POST", f"{url}/api/inspect", json=body, timeout=60) as r:
            assert r.status_code == 200
            return list(_sse(r))

    return run


@pytest.fixture(scope="session")
def complete():
    """`complete(url, seed)`: content, finish reason and logprobs of one sampled chat completion."""
    import httpx

    def run(url: str, seed: int) -> dict:
        body = {"messages": [{"role": "user", "content": f"Tell me about number {seed}."}], "max_tokens": 24,
                "temperature": 1.0, "seed": seed, "logprobs": True}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        return {"content": choice["message"]["content"], "finish": choice["finish_reason"],
                "logprobs": [c["logprob"] for c in choice["logprobs"]["content"]]}

    return run


@pytest.fixture(scope="session")
def wait_idle():
    """`wait_idle(url)`: /api/info once no generation is running (10 s at most)."""
    import httpx

    def run(url: str) -> dict:
        for _ in range(200):  # 10 s at most
            info = httpx.get(f"{url}/api/info", timeout=10).json()
            if info["active"] == 0:
                return info
            time.sleep(0.05)
        raise AssertionError(f"generations still running: {info}")

    return run


@pytest.fixture(scope="session")
def encode_document():
    """The pretrain format of one document written out plainly, `(tok, text) -> ids + [<|eot|>]`: the
    reference the cache's bulk encoding (`format.pretrain.encode_documents`) is held to."""
    return lambda tok, text: tok.encode(text) + [tok.eot_id]


@pytest.fixture
def mps_rules():
    """The test runs under MPS's rules with the CPU as the device (pocketlm/mps_rules.py): float64 or
    complex tensors, non_blocking copies from unpinned memory, device work from two threads at once and
    known-bad MPS kernels raise MPSRuleError."""
    from pocketlm.mps_rules import MPSRules

    with MPSRules() as rules:
        yield rules


# --- export clients ---------------------------------------------------------------------------------

# CI installs every client (`pip install -e '.[test,llama]'`) and sets this, so a client that is missing
# or fails to import there is a failure, not a skip.
REQUIRE_EXPORT_CLIENTS = "POCKETLM_REQUIRE_EXPORT_CLIENTS"
REPLY_TOKENS = 24


@pytest.fixture(scope="session")
def export_chats() -> list[list[dict]]:
    """Three chats, from plain text: the first is the 3-turn conversation (system, user, assistant, user)."""
    return [
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is Paris."},
         {"role": "user", "content": "Tell me one thing about it!"}],
        [{"role": "user", "content": "Who are you?"}],
        [{"role": "user", "content": "Give three tips for staying healthy, and explain why (briefly)."}],
    ]


@pytest.fixture(scope="session")
def reply_tokens() -> int:
    """How many tokens the export tests let each reply run."""
    return REPLY_TOKENS


@pytest.fixture(scope="session")
def need_client() -> Callable[[str, str], ModuleType]:
    """`need_client(module, why)`: import a client, or skip with a precise reason (fail under
    POCKETLM_REQUIRE_EXPORT_CLIENTS=1)."""
    def need(module: str, why: str) -> ModuleType:
        try:
            return importlib.import_module(module)
        except Exception as e:  # an import that fails for any reason (missing, broken build) is reported
            message = f"{module} cannot be imported ({type(e).__name__}: {e}); {why}"
            if os.environ.get(REQUIRE_EXPORT_CLIENTS) == "1":
                pytest.fail(message)
            pytest.skip(message)

    return need


@pytest.fixture(scope="session")
def pocketlm_reply():
    """`pocketlm_reply(model, tok, messages, n=REPLY_TOKENS)`: (prompt ids, greedy reply ids) as pocketlm
    makes them; the reply ends with <|eot|> if it stops."""
    from pocketlm.infer.generate import generate
    from pocketlm.infer.sampling import GenConfig
    from pocketlm.tokenizer.chat_template import format_chat_tokens

    def reply(model, tok, messages: list[dict], n: int = REPLY_TOKENS) -> tuple[list[int], list[int]]:
        prompt = format_chat_tokens(tok, messages)
        return prompt, [s.id for s in generate(model, tok, prompt, GenConfig(max_new_tokens=n, temperature=0.0))]

    return reply
