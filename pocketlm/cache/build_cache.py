"""`pocketlm cache build`: tokenize sources once into sharded token files plus meta.json.

Documents are encoded in chunks by a thread pool and written in input order, so the output does not
depend on the number of workers; shards are flushed at a size cap, so memory stays bounded whatever
the size of the data.
Each document goes to the train or the val split by a hash of its id, the same in every build.
The file layout and meta.json fields are specified in docs/CACHE.md (and `shards.py`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from pocketlm import PocketLMError
from pocketlm.cache import shards
from pocketlm.cache.config import CacheConfig
from pocketlm.files import atomic_write
from pocketlm.format import IGNORE_INDEX, pretrain, sft
from pocketlm.tokenizer.tokenizer_sp import MODEL_FILE, Tokenizer

if TYPE_CHECKING:
    from tqdm import tqdm

KINDS = {"pretrain": "doc", "sft": "chat", "eval": "doc"}  # tag -> the data stage's record kind
# An `eval` source is stored as pretrain documents that all go to the val split: an eval-only set
# (WikiText) is small, and a 2% hash split of it could leave no validation text at all.
EVAL_ONLY = "eval"


class Encoded(NamedTuple):
    split: str
    ids: np.ndarray
    mask: np.ndarray | None  # sft only: 1 where the token is a loss target
    text_bytes: int


def val_split(source: str, doc_id: str, val_fraction: float) -> str:
    """'val' for a stable share of document ids: blake2b, so every build and run agrees."""
    h = hashlib.blake2b(f"{source}\0{doc_id}".encode("utf-8"), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") / 2.0**64 < val_fraction else "train"


def encode_records(tok: Tokenizer, kind: str, source: str, val_fraction: float, sft_mask: str,
                   records: Sequence[dict]) -> list[Encoded | str]:
    """Encode records of one source; a dropped record becomes its drop reason."""
    if kind == "pretrain":
        return _encode_documents(tok, source, val_fraction, records)
    out: list[Encoded | str] = []
    for rec in records:
        if not sft.has_assistant_turn(rec["messages"]):
            out.append("no_assistant_turn")
            continue
        ids, labels = sft.encode_chat(tok, rec["messages"], mask=sft_mask)
        mask = (np.asarray(labels) != IGNORE_INDEX).astype(np.uint8)
        n_bytes = sum(len(m["content"].encode("utf-8")) for m in rec["messages"])
        split = val_split(source, str(rec["id"]), val_fraction)
        out.append(Encoded(split, np.asarray(ids, dtype=np.uint32), mask, n_bytes))
    return out


def _encode_documents(tok: Tokenizer, source: str, val_fraction: float,
                      records: Sequence[dict]) -> list[Encoded | str]:
    """Pretrain records in one bulk encode: per-document calls would create a Python int per token."""
    texts = [rec["text"] for rec in records if rec["text"]]
    encoded = iter(pretrain.encode_documents(tok, texts))
    out: list[Encoded | str] = []
    for rec in records:
        if not rec["text"]:
            out.append("empty_text")
            continue
        split = val_split(source, str(rec["id"]), val_fraction)
        out.append(Encoded(split, next(encoded), None, len(rec["text"].encode("utf-8"))))
    return out


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, jobs: Iterable, ahead: int) -> Iterator:
    """fn over jobs in the pool, results in input order, at most `ahead` jobs in flight.

    Executor.map would be simpler but has no back-pressure: it submits every job at once, so the
    whole source would be read and its results pile up in memory whenever writing falls behind.
    """
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, *job))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def chunks(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _prepare_out_dir(out_dir: Path, names: list[str]) -> None:
    """Invalidate any previous cache first (meta.json goes), then clear the folders we rewrite."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / shards.META_NAME).unlink(missing_ok=True)
    for name in names:
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        for p in folder.iterdir():
            if p.name.startswith("shard_"):
                p.unlink()


def _parse_specs(specs: Sequence[tuple[str, str]]) -> list[tuple[str, object, str]]:
    from pocketlm.data.sources import parse_spec, source_kind

    parsed, seen = [], set()
    for text, kind in specs:
        if kind not in KINDS:
            raise PocketLMError(f"source {text!r} is tagged {kind!r}; tag it 'pretrain', 'eval' or 'sft'")
        spec = parse_spec(text)
        if source_kind(spec.name) != KINDS[kind]:
            flag = "--pretrain or --eval" if kind == "sft" else "--sft"
            raise PocketLMError(f"source {spec.name!r} holds {source_kind(spec.name)} records, not "
                                f"{KINDS[kind]}s: pass it with {flag}")
        if spec.name in seen:
            raise PocketLMError(f"source {spec.name!r} is given twice; give each source once")
        seen.add(spec.name)
        parsed.append((text, spec, kind))
    if not parsed:
        raise PocketLMError("no sources given: pass --pretrain and/or --sft source specs")
    return parsed


def _check_hub(parsed: list[tuple[str, object, str]], data_dir: str | Path | None) -> None:
    """Before anything is written: when the hub cannot be reached, one line naming every source that
    needs it (not only the first one read)."""
    from pocketlm.data.hub import check_reachable, reads_hub
    from pocketlm.data.sources import SOURCES, resolve_data_dir

    root = resolve_data_dir(data_dir)
    on_hub = [spec.name for _, spec, _ in parsed if reads_hub(spec, root)]  # type: ignore[attr-defined]
    if on_hub:
        check_reachable(on_hub, [SOURCES[n].hub_id or "" for n in on_hub])


def build_cache(tokenizer_path: str | Path, specs: Sequence[tuple[str, str]], out_dir: str | Path,
                seed: int = CacheConfig.seed, data_dir: str | Path | None = None, *,
                val_fraction: float = CacheConfig.val_fraction, workers: int = CacheConfig.workers,
                shard_tokens: int = CacheConfig.shard_tokens, sft_mask: str = CacheConfig.sft_mask,
                chunk_docs: int = 256, progress: bool = True) -> dict:
    """Write the cache for `specs` (each `("name:key=value,...", "pretrain" | "sft")`); returns meta.

    The build draws no random numbers (the val split hashes ids, so it is the same for every seed):
    `seed` is recorded in meta.json as the default seed of the datasets that read the cache.
    """
    from tqdm import tqdm

    from pocketlm.data.sources import SourceStats, open_source

    if not 0.0 <= val_fraction < 1.0:
        raise PocketLMError(f"val_fraction {val_fraction} must be in [0, 1): pass e.g. --val-fraction 0.02")
    if sft_mask not in sft.MASK_MODES:
        raise PocketLMError(f"sft_mask {sft_mask!r} must be one of {', '.join(sft.MASK_MODES)}")
    parsed = _parse_specs(specs)
    tok = Tokenizer.load(tokenizer_path)
    _check_hub(parsed, data_dir)
    out_dir = Path(out_dir)
    dtype = shards.token_dtype(tok.vocab_size)
    # One encoding thread more than cores: this thread's reading and writing hold the GIL in bursts,
    # and with only one thread per core a core idles through them (measured in bench/cache_build.py).
    workers = workers or (os.cpu_count() or 1) + 1
    _prepare_out_dir(out_dir, [spec.name for _, spec, _ in parsed])
    token_bytes = np.asarray(tok.token_byte_lengths(), dtype=np.int32)
    meta = {
        "magic": shards.MAGIC, "format_version": shards.FORMAT_VERSION, "dtype": dtype.str,
        # A copy of the tokenizer travels with the cache, so training needs nothing outside this folder.
        "tokenizer": {"sha256": tok.hash, "path": str(Path(tok.path).resolve()), "vocab_size": tok.vocab_size,
                      "eot_id": tok.eot_id, "special_ids": tok.special_token_ids(),
                      "file": atomic_write(out_dir / MODEL_FILE, Path(tok.path).read_bytes())},
        "token_bytes": atomic_write(out_dir / shards.TOKEN_BYTES_NAME, _npy_bytes(token_bytes)),
        "seed": seed, "val_fraction": val_fraction, "sft_mask": sft_mask, "shard_tokens": shard_tokens,
        "sources": {},
    }
    # Threads, not processes: SentencePiece encodes with the GIL released, so the threads run on all
    # cores while this one reads and writes, and no ids are pickled between processes.
    with ThreadPoolExecutor(workers) as pool:
        for text, spec, tag in parsed:
            kind, fraction = ("pretrain", 1.0) if tag == EVAL_ONLY else (tag, val_fraction)
            stats = SourceStats()
            records = open_source(spec, data_dir=data_dir, stats=stats)
            jobs = ((tok, kind, spec.name, fraction, sft_mask, c) for c in chunks(records, chunk_docs))
            results = ordered_map(pool, encode_records, jobs, ahead=2 * workers)
            with tqdm(desc=f"{spec.name} ({kind})", unit="doc", disable=not progress) as bar:
                src = _write_source(out_dir / spec.name, kind, dtype, shard_tokens, token_bytes, results, bar)
            src["spec"] = text
            src["eval_only"] = tag == EVAL_ONLY
            src["dropped"] = dict(sorted((src["dropped"] + stats.dropped).items()))
            meta["sources"][spec.name] = src
    shards.write_meta(out_dir, meta)
    return meta


def _write_source(folder: Path, kind: str, dtype: np.dtype, shard_tokens: int, token_bytes: np.ndarray,
                  results: Iterable[list[Encoded | str]], bar: tqdm) -> dict:
    """Shards of one source from encoded chunks; returns its meta entry (without the spec)."""
    numbers = itertools.count()
    writers = {s: shards.ShardWriter(folder, s, dtype, shard_tokens, kind == "sft", numbers)
               for s in shards.SPLITS}
    keys = ("docs", "tokens", "text_bytes") + (("supervised_tokens", "supervised_bytes") if kind == "sft" else ())
    counts = {s: dict.fromkeys(keys, 0) for s in shards.SPLITS}
    dropped: Counter = Counter()
    t0, n_tokens = time.perf_counter(), 0
    for chunk in results:
        for r in chunk:
            if isinstance(r, str):
                dropped[r] += 1
                continue
            writers[r.split].add(r.ids, r.mask)
            c = counts[r.split]
            c["docs"] += 1
            c["tokens"] += len(r.ids)
            c["text_bytes"] += r.text_bytes
            if r.mask is not None:
                c["supervised_tokens"] += int(r.mask.sum())
                c["supervised_bytes"] += int(token_bytes[r.ids[r.mask != 0]].sum())
            n_tokens += len(r.ids)
        bar.update(len(chunk))
        bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
    for w in writers.values():
        w.close()
    return {"kind": kind, "counts": counts, "dropped": dropped,
            "shards": sorted(writers["train"].shards + writers["val"].shards, key=lambda s: s["name"])}


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
