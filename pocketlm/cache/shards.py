"""On-disk format of the token cache: writing shards, meta.json, and checked reading.

    DIR/meta.json                   written last: a folder without a valid one is not a cache
    DIR/token_bytes.npy             UTF-8 bytes each token id stands for (bits per byte)
    DIR/<source>/shard_NNNNN.bin    token ids, little-endian uint16 (vocab <= 65536) or uint32
    DIR/<source>/shard_NNNNN.idx    little-endian int64 document start offsets, n_docs + 1 entries
    DIR/<source>/shard_NNNNN.mask   uint8 per token, 1 = the token is a loss target (sft only)

Every file is written under a `.tmp` name and renamed when complete. docs/CACHE.md is the full spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from pocketlm import PocketLMError
from pocketlm.files import AtomicFile, atomic_write, sha256_file

MAGIC = "pocketlm-token-cache"
FORMAT_VERSION = 1
META_NAME = "meta.json"
TOKEN_BYTES_NAME = "token_bytes.npy"
SPLITS = ("train", "val")
IDX_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")
Verify = Literal["sha256", "size"]
WRITE_TOKENS = 1 << 18  # ids buffered before a shard writer writes them out


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends the documents of one source and split to shards, starting a new shard at a size cap.

    Shard numbers come from `numbers`, shared by the source's train and val writers so each shard
    name is unique within the source folder. A document is never split across shards.
    """

    def __init__(self, source_dir: Path, split: str, dtype: np.dtype, max_tokens: int, with_mask: bool,
                 numbers: Iterator[int]):
        self.source_dir, self.split, self.dtype = source_dir, split, dtype
        self.max_tokens, self.with_mask, self.numbers = max_tokens, with_mask, numbers
        self.shards: list[dict] = []
        self._open: tuple[str, AtomicFile, AtomicFile | None] | None = None
        self._offsets: list[int] = [0]
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_tokens = 0

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        if self._open is None:
            name = f"shard_{next(self.numbers):05d}"
            mask_file = AtomicFile(self.source_dir / f"{name}.mask") if self.with_mask else None
            self._open = (name, AtomicFile(self.source_dir / f"{name}.bin"), mask_file)
        self._pending.append((ids, mask))
        self._pending_tokens += len(ids)
        self._offsets.append(self._offsets[-1] + len(ids))
        if self._offsets[-1] >= self.max_tokens:
            self.close()
        elif self._pending_tokens >= WRITE_TOKENS:
            self._write_pending()

    def _write_pending(self) -> None:
        """One cast, write and hash update for many documents: per-document calls cost the build's
        main thread more than the bytes do."""
        if not self._pending:
            return
        assert self._open is not None
        _, bin_file, mask_file = self._open
        ids = np.concatenate([ids for ids, _ in self._pending], dtype=self.dtype, casting="unsafe")
        bin_file.write(ids.tobytes())
        if mask_file is not None:
            mask = np.concatenate([m for _, m in self._pending], dtype=MASK_DTYPE, casting="unsafe")
            mask_file.write(mask.tobytes())
        self._pending, self._pending_tokens = [], 0

    def close(self) -> None:
        """Finish the open shard, if any (files renamed into place, entry added to `shards`)."""
        if self._open is None:
            return
        self._write_pending()
        name, bin_file, mask_file = self._open
        files = {"bin": bin_file.close()}
        if mask_file is not None:
            files["mask"] = mask_file.close()
        offsets = np.asarray(self._offsets, dtype=IDX_DTYPE)
        files["idx"] = atomic_write(self.source_dir / f"{name}.idx", offsets.tobytes())
        self.shards.append({"name": name, "split": self.split, "docs": len(offsets) - 1,
                            "tokens": int(offsets[-1]), "files": files})
        self._open, self._offsets = None, [0]


def write_meta(out_dir: Path, meta: dict) -> None:
    atomic_write(out_dir / META_NAME, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def read_meta(cache_dir: Path) -> dict:
    path = cache_dir / META_NAME
    if not path.is_file():
        raise PocketLMError(f"{path} not found: {cache_dir} is not a finished token cache (the build was "
                            "interrupted or never ran); build it with `pocketlm cache build`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PocketLMError(f"{path} is not valid JSON ({e}); rebuild the cache with `pocketlm cache build`") from None
    if not isinstance(meta, dict) or meta.get("magic") != MAGIC:
        raise PocketLMError(f"{path} is not a pocketlm token cache (magic != {MAGIC!r}); point at a cache folder")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PocketLMError(f"{path} has format_version {meta.get('format_version')}, this pocketlm reads "
                            f"{FORMAT_VERSION}; rebuild the cache with `pocketlm cache build`")
    return meta


def check_file(path: Path, entry: dict, verify: Verify) -> None:
    """The promised size (and sha256 unless verify="size"), or an error naming the file and the fix."""
    fix = "the cache is damaged: rebuild it with `pocketlm cache build`"
    if not path.is_file():
        raise PocketLMError(f"{path} is missing; {fix}")
    size = path.stat().st_size
    if size != entry["size"]:
        raise PocketLMError(f"{path} is {size} bytes, meta.json says {entry['size']} (truncated?); {fix}")
    if verify == "sha256" and sha256_file(path) != entry["sha256"]:
        raise PocketLMError(f"{path} sha256 does not match meta.json; {fix}")


@dataclass(frozen=True)
class Stream:
    """One source's shards of one split, read as a single token stream (documents back to back)."""

    source: str
    split: str
    kind: str
    dtype: np.dtype
    bins: tuple[Path, ...]
    masks: tuple[Path, ...] | None
    idxs: tuple[Path, ...]
    starts: np.ndarray  # token offset of each shard in the stream, plus the total at the end

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int, mask: bool = False) -> np.ndarray:
        """Tokens (or loss-mask bytes) [start, stop) of the stream as int64."""
        return self.read_many([(start, stop)], mask)[0]

    def read_many(self, spans: list[tuple[int, int]], mask: bool = False) -> list[np.ndarray]:
        """`read` for several [start, stop) spans, mapping each shard file at most once."""
        files, dtype = (self.masks, MASK_DTYPE) if mask else (self.bins, self.dtype)
        # Fresh memmaps per call, dropped on return: a long-lived np.memmap keeps every page it
        # touched counted as resident and memory grows over a run (nanoGPT's train.py note).
        maps: dict[int, np.memmap] = {}
        out = []
        for start, stop in spans:
            piece = np.empty(stop - start, dtype=np.int64)
            at, k = start, int(np.searchsorted(self.starts, start, side="right")) - 1
            while at < stop:
                if k not in maps:
                    maps[k] = np.memmap(files[k], dtype=dtype, mode="r")
                lo, hi = at - self.starts[k], min(stop, self.starts[k + 1]) - self.starts[k]
                piece[at - start:at - start + hi - lo] = maps[k][lo:hi]
                at, k = at + hi - lo, k + 1
            out.append(piece)
        return out

    def doc_starts(self) -> np.ndarray:
        """Stream offset of every document's first token, plus the total at the end."""
        parts = [np.fromfile(p, dtype=IDX_DTYPE)[:-1] + s for p, s in zip(self.idxs, self.starts[:-1])]
        return np.concatenate(parts + [self.starts[-1:]]).astype(np.int64)


class Cache:
    """A finished cache folder: meta.json read and every file checked before anything is used."""

    def __init__(self, cache_dir: str | Path, tokenizer_hash: str | None = None, verify: Verify = "sha256"):
        self.dir = Path(cache_dir)
        self.meta = read_meta(self.dir)
        tok = self.meta["tokenizer"]
        if tokenizer_hash is not None and tokenizer_hash != tok["sha256"]:
            raise PocketLMError(
                f"{self.dir / META_NAME}: cache was built with tokenizer sha256 {tok['sha256'][:12]}… "
                f"({tok['path']}), not the given one ({tokenizer_hash[:12]}…); rebuild the cache with "
                "this tokenizer or train with the cache's tokenizer")
        check_file(self.dir / TOKEN_BYTES_NAME, self.meta["token_bytes"], verify)
        for name, src in self.meta["sources"].items():
            for shard in src["shards"]:
                for ext, entry in shard["files"].items():
                    check_file(self.dir / name / f"{shard['name']}.{ext}", entry, verify)
        self.dtype = np.dtype(self.meta["dtype"])
        self.eot_id = int(tok["eot_id"])
        self.vocab_size = int(tok["vocab_size"])

    def sources(self, kind: str) -> list[str]:
        return sorted(n for n, s in self.meta["sources"].items() if s["kind"] == kind)

    def token_bytes(self) -> np.ndarray:
        return np.load(self.dir / TOKEN_BYTES_NAME).astype(np.int64)

    def stream(self, source: str, split: str) -> Stream:
        if source not in self.meta["sources"]:
            raise PocketLMError(f"{self.dir}: no source {source!r} in this cache (it has "
                                f"{', '.join(sorted(self.meta['sources']))}); rebuild it with that source")
        src = self.meta["sources"][source]
        shards = [s for s in src["shards"] if s["split"] == split]
        folder = self.dir / source
        return Stream(
            source=source, split=split, kind=src["kind"], dtype=self.dtype,
            bins=tuple(folder / f"{s['name']}.bin" for s in shards),
            masks=tuple(folder / f"{s['name']}.mask" for s in shards) if src["kind"] == "sft" else None,
            idxs=tuple(folder / f"{s['name']}.idx" for s in shards),
            starts=np.concatenate([[0], np.cumsum([s["tokens"] for s in shards])]).astype(np.int64))
