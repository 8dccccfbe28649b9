"""Training batches read from a token cache: PretrainData (random windows from a mixture of
document sources) and SFTData (whole conversations packed into rows).

`batch(step, ...)` is a pure function of (seed, step, rank), so a resumed run sees the batches it
would have seen. A batch is a dict of int64 CPU tensors of shape (B, T):
  x, y          inputs and next-token targets (y = -100 where no loss is taken)
  positions     RoPE positions, restarting at 0 for each document / conversation
  doc_ids       attention stays among tokens with equal ids (and is causal)
plus "sources" (the source name of each row).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from pocketlm import PocketLMError
from pocketlm.cache.config import DEFAULT_MIXTURE
from pocketlm.cache.shards import SPLITS, Cache, Stream, Verify
from pocketlm.format.packing import best_fit_pack, pack_row, truncate_length
from pocketlm.format.pretrain import window_positions

Batch = dict  # str -> torch.Tensor (B, T), plus "sources": list[str]


def step_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, rank])


def _check_args(split: str, block_size: int) -> None:
    if split not in SPLITS:
        raise PocketLMError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if block_size < 2:
        raise PocketLMError(f"block_size {block_size} is too small: use at least 2 (e.g. 1024)")


def _check_rank(rank: int, world: int) -> None:
    if not 0 <= rank < world:
        raise PocketLMError(f"rank {rank} is outside world size {world}: need 0 <= rank < world")


def mixture_weights(weights: Mapping[str, float], usable: Sequence[str], what: str) -> dict[str, float]:
    """Weights over the usable sources, summing to 1. Sources not usable are dropped with a warning."""
    bad = {k: w for k, w in weights.items() if not w >= 0}
    if bad:
        raise PocketLMError(f"{what} weights must be >= 0; got {bad}")
    kept = {k: float(w) for k, w in sorted(weights.items()) if k in usable and w > 0}
    missing = sorted(k for k, w in weights.items() if k not in usable and w > 0)
    if not kept:
        raise PocketLMError(f"none of the {what} sources {sorted(weights)} is usable in this cache "
                            f"(usable: {', '.join(usable) or 'none'}); build the cache with them or change the mixture")
    if missing:
        warnings.warn(f"{what} sources {', '.join(missing)} are absent or too small; "
                      f"the other weights are renormalized", stacklevel=3)
    total = sum(kept.values())
    return {k: w / total for k, w in kept.items()}


def mixture_picks(rng: np.random.Generator, mixture: Mapping[str, float], batch_size: int,
                  n_choices: Mapping[str, int]) -> list[tuple[str, int]]:
    """One (source, index) per row: the source drawn by mixture weight, then an index below n_choices."""
    names = list(mixture)
    chosen = rng.choice(len(names), size=batch_size, p=list(mixture.values()))
    return [(names[k], int(rng.integers(0, n_choices[names[k]]))) for k in chosen]


def interleave(sizes: Mapping[str, int]) -> list[tuple[str, int]]:
    """Every (source, i < size), ordered so that all sources advance at the same relative pace."""
    items = [(i / n, name, i) for name, n in sizes.items() for i in range(n)]
    return [(name, i) for _, name, i in sorted(items)]


def to_batch(rows: list[dict[str, np.ndarray]], sources: list[str]) -> Batch:
    out: Batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in ("x", "y", "positions", "doc_ids")}
    out["sources"] = sources
    return out


class PretrainData:
    """Random windows of block_size + 1 tokens from the document sources of a cache, by mixture."""

    def __init__(self, cache_dir: str | Path, mixture: Mapping[str, float] | None = None, block_size: int = 1024,
                 seed: int | None = None, split: str = "train", *, tokenizer_hash: str | None = None,
                 verify: Verify = "sha256"):
        _check_args(split, block_size)
        cache = Cache(cache_dir, tokenizer_hash, verify)
        self.block_size, self.split = block_size, split
        self.seed = cache.meta["seed"] if seed is None else seed
        self.eot_id = cache.eot_id
        streams = {n: cache.stream(n, split) for n in cache.sources("pretrain")}
        usable = [n for n, s in streams.items() if s.n_tokens > block_size]
        self.mixture = mixture_weights(DEFAULT_MIXTURE if mixture is None else mixture, usable,
                                       f"pretrain ({split})")
        self.streams: dict[str, Stream] = {n: streams[n] for n in self.mixture}

    def _rows(self, picks: list[tuple[str, int]]) -> Batch:
        t = self.block_size
        windows = np.empty((len(picks), t + 1), dtype=np.int64)
        for name, stream in self.streams.items():
            at = [i for i, (n, _) in enumerate(picks) if n == name]
            spans = [(picks[i][1], picks[i][1] + t + 1) for i in at]
            windows[at] = np.array(stream.read_many(spans)).reshape(len(at), t + 1)
        x, y = windows[:, :-1], windows[:, 1:]
        positions, doc_ids = window_positions(x, self.eot_id)
        rows = [{"x": x[i], "y": y[i], "positions": positions[i], "doc_ids": doc_ids[i]} for i in range(len(picks))]
        return to_batch(rows, [name for name, _ in picks])

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        _check_rank(rank, world)
        return self._rows(mixture_picks(step_rng(self.seed, step, rank), self.mixture, batch_size,
                                        {n: s.n_tokens - self.block_size for n, s in self.streams.items()}))

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[Batch]:
        """Non-overlapping windows covering each source's stream, the sources interleaved; the same
        for every run and seed. The last batch may be smaller than batch_size."""
        t = self.block_size
        sizes = {n: (s.n_tokens - 1) // t for n, s in self.streams.items()}
        picks = [(name, i * t) for name, i in interleave(sizes)]
        for b, at in enumerate(range(0, len(picks), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self._rows(picks[at:at + batch_size])


class _PackedSource:
    """One chat source's split, packed into rows once: conversation spans plus rows of them."""

    def __init__(self, stream: Stream, block_size: int, pack: bool = True):
        self.stream = stream
        starts = stream.doc_starts()
        lengths = np.diff(starts)
        keep = lengths.copy()
        # Only conversations longer than a row need their mask read: the builder guarantees every
        # stored conversation has a supervised token (the <|eot|> closing an assistant turn).
        for i in np.flatnonzero(lengths > block_size):
            keep[i] = truncate_length(stream.read(starts[i], starts[i] + block_size + 1, mask=True), block_size)
        usable = np.flatnonzero(keep > 0)
        self.dropped = len(lengths) - len(usable)
        self.starts, self.keep = starts[usable], keep[usable]
        self.rows = best_fit_pack(self.keep.tolist(), block_size) if pack else [[i] for i in range(len(self.keep))]

    def pack(self, rs: list[int], block_size: int, pad_id: int) -> list[dict[str, np.ndarray]]:
        items = [[(int(self.starts[i]), int(self.starts[i] + self.keep[i])) for i in self.rows[r]] for r in rs]
        spans = [span for row in items for span in row]
        ids, masks = iter(self.stream.read_many(spans)), iter(self.stream.read_many(spans, mask=True))
        return [pack_row([(next(ids), next(masks)) for _ in row], block_size, pad_id) for row in items]


class SFTData:
    """Rows of whole conversations (best-fit packed, each attending only to itself; `pack=False`: one
    conversation per row), by mixture."""

    def __init__(self, cache_dir: str | Path, sources: Sequence[str] | Mapping[str, float] | None = None,
                 block_size: int = 1024, seed: int | None = None, split: str = "train", *,
                 tokenizer_hash: str | None = None, verify: Verify = "sha256", pack: bool = True):
        _check_args(split, block_size)
        cache = Cache(cache_dir, tokenizer_hash, verify)
        self.block_size, self.split = block_size, split
        self.seed = cache.meta["seed"] if seed is None else seed
        self.eot_id = cache.eot_id
        chat = cache.sources("sft")
        if sources is None:
            sources = chat
        weights = dict(sources) if isinstance(sources, Mapping) else dict.fromkeys(sources, 1.0)
        not_chat = sorted(set(weights) & set(cache.sources("pretrain")))
        if not_chat:
            raise PocketLMError(f"sources {', '.join(not_chat)} are pretrain sources in {cache_dir}; "
                                "SFTData reads sft sources (use PretrainData for documents)")
        packed = {n: _PackedSource(cache.stream(n, split), block_size, pack) for n in chat if n in weights}
        self.dropped = {n: p.dropped for n, p in packed.items()}
        skipped = {n: d for n, d in self.dropped.items() if d}
        if skipped:
            warnings.warn(f"conversations whose prompt alone exceeds block_size {block_size} were skipped: "
                          f"{skipped}", stacklevel=2)
        usable = [n for n, p in packed.items() if p.rows]
        self.mixture = mixture_weights(weights, usable, f"sft ({split})")
        self.packed = {n: packed[n] for n in self.mixture}

    def n_rows(self, source: str) -> int:
        return len(self.packed[source].rows)

    def _rows(self, picks: list[tuple[str, int]]) -> Batch:
        rows: list[dict[str, np.ndarray]] = [{} for _ in picks]
        for name, packed in self.packed.items():
            at = [i for i, (n, _) in enumerate(picks) if n == name]
            for i, row in zip(at, packed.pack([picks[i][1] for i in at], self.block_size, self.eot_id)):
                rows[i] = row
        return to_batch(rows, [name for name, _ in picks])

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        _check_rank(rank, world)
        return self._rows(mixture_picks(step_rng(self.seed, step, rank), self.mixture, batch_size,
                                        {n: self.n_rows(n) for n in self.packed}))

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[Batch]:
        """Every packed row once, the sources interleaved; the last batch may be smaller."""
        picks = interleave({n: self.n_rows(n) for n in self.packed})
        for b, at in enumerate(range(0, len(picks), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self._rows(picks[at:at + batch_size])
