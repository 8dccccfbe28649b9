"""The run page: a training run watched as it learns (`pocketlm serve --run runs/NAME`).

Everything comes from what training writes in the run folder (pocketlm/train/run.py and metrics.py):
`config.json` (the resolved config and the plan's lines), `metrics.jsonl` (train, eval, sample,
snapshot and stop lines) and the checkpoints `{phase}/{best,last}` and snapshots. The page follows
`metrics.jsonl` through one SSE stream that tails the file; nothing is stored here.

Routes: `GET /run` (the page), `GET /api/run` (name, config, plan), `GET /api/run/stream` (SSE:
`config`, `metrics` with the new lines, `reset` when a resumed run rewrote the file),
`GET /api/run/checkpoints`, `POST /api/run/compare` (two checkpoints on one text, pocketlm/serve/compare.py)
and `POST /api/run/open` (load a checkpoint's weights into the inspector at `/`).

Clients name checkpoints by id (`pretrain/best`, `pretrain/step-000500`): an id is looked up among the
checkpoints listed from the run folder, so nothing a client sends becomes a path. Besides the
server-wide Host/Origin guard, these routes refuse any request that carries another site's Origin,
reads included, and mark their answers `Cross-Origin-Resource-Policy: same-origin`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from pocketlm import PocketLMError
from pocketlm.model.io import load_model, read_model_folder
from pocketlm.serve.compare import compare
from pocketlm.serve.guard import _same_origin
from pocketlm.serve.prompt import RequestError

# The train stage's run folder (serve may not import train: docs/ARCHITECTURE.md).
CONFIG_FILE, METRICS_FILE = "config.json", "metrics.jsonl"
CHECKPOINT_KINDS = ("best", "last")
PHASES = ("pretrain", "sft")
POLL_S = 0.5  # how often the stream looks at metrics.jsonl (training appends a line every few seconds)
MODELS_KEPT = 2  # checkpoints kept loaded for comparisons (both sides of the last one)
_MODELS_LOCK = threading.Lock()  # comparisons run in worker threads: one loads at a time
STATIC = Path(__file__).parent / "static"
# What the page may load: only this server's own files (no inline script or style, no eval).
PAGE_CSP = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
SAME_ORIGIN = {"Cross-Origin-Resource-Policy": "same-origin"}  # set by hand where a route returns a Response
log = logging.getLogger("pocketlm.serve")


async def _own_origin_only(request: Request, response: Response) -> None:
    """Reads of a run are the run's owner's: a request another site's page makes (it carries that
    site's Origin, GETs and EventSource included) is refused, and answers may not be embedded elsewhere."""
    origin = request.headers.get("origin")
    if origin is not None and not _same_origin(origin, request.headers.get("host", "")):
        raise RequestError(403, f"cross-origin request from {origin!r} refused: only this server's own page may "
                                "read the run", "origin")
    response.headers.update(SAME_ORIGIN)


# The page's own routes, documented in docs/INSPECTOR.md; /openapi.json keeps to the APIs for clients.
router = APIRouter(dependencies=[Depends(_own_origin_only)], include_in_schema=False)


@dataclass(frozen=True)
class Checkpoint:
    id: str  # `PHASE/best`, `PHASE/last` or `PHASE/step-NNNNNN` (a snapshot)
    phase: str
    kind: str  # best | last | snapshot
    step: int
    val_loss: float | None
    path: Path

    def public(self) -> dict:
        return {"id": self.id, "phase": self.phase, "kind": self.kind, "step": self.step, "val_loss": self.val_loss}


def run_dir_of(request: Request) -> Path:
    run_dir = getattr(request.app.state, "run_dir", None)
    if run_dir is None:
        raise RequestError(404, "this server shows no run: start it with pocketlm serve --run runs/NAME", None)
    return run_dir


def read_config(run_dir: Path) -> dict | None:
    """config.json without local paths, or None while it is missing or half-written."""
    try:
        cfg = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    cfg.pop("tokenizer", None)
    return cfg


def _records(run_dir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a line being written, or one that is not JSON, is skipped)."""
    try:
        data = (run_dir / METRICS_FILE).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            out.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return [r for r in out if isinstance(r, dict)]


def _inside(run_dir: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(run_dir.resolve())


def checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The run's model folders: each phase's best/ and last/, and the snapshots its metrics list, in
    training order (a snapshot whose folder is gone, or lies outside the run folder, is left out)."""
    found: dict[str, Checkpoint] = {}
    for r in _records(run_dir):
        if r.get("kind") != "snapshot" or r.get("phase") not in PHASES:
            continue
        path = run_dir / str(r["path"])
        if _inside(run_dir, path) and (path / "model.json").is_file():
            cid = f"{r['phase']}/{path.name}"
            found[cid] = Checkpoint(cid, r["phase"], "snapshot", int(r["step"]), r.get("val_loss"), path)
    for phase in PHASES:
        for kind in CHECKPOINT_KINDS:
            path = run_dir / phase / kind
            try:
                meta = json.loads((path / "model.json").read_text(encoding="utf-8"))["meta"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                continue
            if _inside(run_dir, path):
                found[f"{phase}/{kind}"] = Checkpoint(f"{phase}/{kind}", phase, kind, int(meta.get("step", 0)),
                                                      meta.get("val_loss"), path)
    order = {"snapshot": 0, "best": 1, "last": 2}
    return sorted(found.values(), key=lambda c: (PHASES.index(c.phase), c.step, order[c.kind]))


def find_checkpoint(run_dir: Path, cid: str, param: str) -> Checkpoint:
    for c in checkpoints(run_dir):
        if c.id == cid:
            return c
    raise RequestError(404, f"{param}: no checkpoint {cid!r} in this run (GET /api/run/checkpoints lists them)", param)


def default_checkpoint(run_dir: Path) -> Path | None:
    """The newest model folder of a run: what `pocketlm serve --run` loads when no --ckpt is given."""
    found = [c for c in checkpoints(run_dir) if c.kind != "best"]
    return found[-1].path if found else None


@router.get("/run", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "run.html", headers={"Content-Security-Policy": PAGE_CSP, **SAME_ORIGIN})


@router.get("/api/run")
async def run_info(request: Request) -> dict:
    run_dir = run_dir_of(request)
    return {"name": run_dir.name, "config": read_config(run_dir), "inspector": request.app.state.model_id}


@router.get("/api/run/checkpoints")
async def list_checkpoints(request: Request) -> dict:
    run_dir = run_dir_of(request)
    return {"checkpoints": [c.public() for c in checkpoints(run_dir)],
            "inspector": getattr(request.app.state, "run_loaded", None)}


def _tail(run_dir: Path, pos: dict) -> tuple[list[str], bool]:
    """New complete lines of metrics.jsonl since `pos` (offset, file identity), and whether the file was
    replaced or shrank (a resumed run rewrites it without the lines past its checkpoint)."""
    path = run_dir / METRICS_FILE
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            ident = (st.st_dev, st.st_ino)
            reset = pos["ident"] is not None and (ident != pos["ident"] or st.st_size < pos["offset"])
            if reset or pos["ident"] is None:
                pos.update(ident=ident, offset=0)
            f.seek(pos["offset"])
            chunk = f.read(st.st_size - pos["offset"])
    except FileNotFoundError:
        return [], False
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next look
    pos["offset"] += end
    return [line.decode("utf-8") for line in chunk[:end].splitlines() if line.strip()], reset


@router.get("/api/run/stream")
async def stream(request: Request) -> EventSourceResponse:
    """`config` (at the start and whenever config.json changes), `metrics` (a list of new lines: all
    existing ones first), `reset` (start over: the file was rewritten)."""
    run_dir = run_dir_of(request)

    async def events():
        pos, config_seen = {"offset": 0, "ident": None}, None
        while True:
            try:
                mtime = (run_dir / CONFIG_FILE).stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime != config_seen and (cfg := read_config(run_dir)) is not None:
                config_seen = mtime
                yield {"event": "config", "data": json.dumps(cfg)}
            lines, reset = _tail(run_dir, pos)
            if reset:
                yield {"event": "reset", "data": "{}"}
            if lines:
                records = []
                for line in lines:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        log.warning("%s: skipped a line that is not JSON", run_dir / METRICS_FILE)
                yield {"event": "metrics", "data": json.dumps(records)}
            await asyncio.sleep(POLL_S)

    return EventSourceResponse(events(), ping=15, headers=SAME_ORIGIN)


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: str = Field(max_length=200)
    b: str = Field(max_length=200)
    text: str = Field(min_length=1)


def _loaded(app, c: Checkpoint):
    """The checkpoint's model on the server's device, from a small cache keyed by its folder (last/ and
    best/ point at a new folder at every save, so a cached model is never stale)."""
    with _MODELS_LOCK:
        if getattr(app.state, "run_models", None) is None:
            app.state.run_models = OrderedDict()
        cache: OrderedDict = app.state.run_models
        key = c.path.resolve()
        if key not in cache:
            device = next(app.state.model.parameters()).device
            cache[key] = load_model(key, device)[0]
            while len(cache) > MODELS_KEPT:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]


def _compare(app, a: Checkpoint, b: Checkpoint, text: str) -> dict:
    tok, table = app.state.tok, app.state.tokens
    ids = tok.encode(text)
    models = [_loaded(app, a), _loaded(app, b)]
    context = min(m.cfg.block_size for m in models)
    if not ids or len(ids) + 1 > context:
        raise RequestError(400, f"text: {len(ids)} tokens; it must have 1 to {context - 1} (the context, less the "
                                "<|eot|> it is read after)", "text")
    for m in models:
        if m.cfg.vocab_size < tok.vocab_size:
            raise RequestError(400, "the checkpoints do not share this server's tokenizer", "a")
    with app.state.engine.lock:  # one thread's device work at a time (MPS)
        changes = compare(models[0], models[1], ids, tok.eot_id)
    tokens = [{**ch.to_dict(), "token": table.labels[ch.id], "bytes": list(table.bytes[ch.id])} for ch in changes]
    return {"a": a.public(), "b": b.public(), "tokens": tokens,  # the text's total bits under each model:
            "bits_a": -sum(t.logprob_a for t in changes) / math.log(2),
            "bits_b": -sum(t.logprob_b for t in changes) / math.log(2)}


@router.post("/api/run/compare")
async def compare_checkpoints(body: CompareRequest, request: Request) -> dict:
    """Both checkpoints read the same tokens of `text`; per token both probabilities and the change in bits."""
    run_dir = run_dir_of(request)
    a, b = find_checkpoint(run_dir, body.a, "a"), find_checkpoint(run_dir, body.b, "b")
    try:
        return await run_in_threadpool(_compare, request.app, a, b, body.text)
    except (PocketLMError, FileNotFoundError) as e:  # a save replaced the folder while it was being read
        raise RequestError(409, f"could not read a checkpoint ({e}); it may have just been replaced: retry",
                           None) from None


class OpenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=200)


@router.post("/api/run/open")
async def open_in_inspector(body: OpenRequest, request: Request) -> dict:
    """Load a checkpoint's weights into the inspector's model (same shape and tokenizer, as every
    checkpoint of a run has), so the chat at `/` talks to it. Refused while a generation runs."""
    state = request.app.state
    c = find_checkpoint(run_dir_of(request), body.id, "id")
    try:
        cfg, weights, info = await run_in_threadpool(read_model_folder, c.path)
    except (PocketLMError, FileNotFoundError) as e:
        raise RequestError(409, f"could not read {c.id} ({e}); it may have just been replaced: retry", "id") from None
    if cfg != state.model.cfg or info["tokenizer_sha256"] != state.tok.hash:
        raise RequestError(400, f"id: {c.id} has another shape or tokenizer than the inspector's model", "id")
    engine = state.engine
    # No await from here on: no generation can be admitted between this check and the copy.
    if engine.jobs:
        raise RequestError(409, f"{len(engine.jobs)} generation(s) running in the inspector; stop them first", "id")
    with engine.lock:
        state.model.load_state_dict(weights)  # copied into the model's own dtype and device
    state.model_id = f"{run_dir_of(request).name}-{re.sub(r'[^A-Za-z0-9_.-]', '-', c.id)}"
    state.run_loaded = c.id
    return {"loaded": c.id, "model": state.model_id, "step": c.step}
