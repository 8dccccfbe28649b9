"""Decoding through one captured CUDA graph per token (the accelerated path; CUDA only).

A decode step is ~30 small kernels per layer in eager mode, and at batch 1 the GPU spends most of a
step waiting for Python to launch them. Here the model's one-token forward is compiled (inductor fuses
the elementwise work) and the whole step is captured once as a CUDA graph, then replayed per token:
forward at the cache's device-side position, sampling, statistics, the position's increment. The host
only draws the sampling noise (one kernel), replays, and copies one small vector back.

Graphs are bound to fixed buffers, so each concurrent generation takes a `Slot` (its own full-length
static KV cache and graphs) from a per-model pool; a slot keeps one graph per sampling setting and
statistics request it has seen. The compiled forward is shared by all slots of all models.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch

from pocketlm.infer.sampling import GenConfig, filtered_logits
from pocketlm.infer.stats import StatsLayout
from pocketlm.model.kv_cache import KVCache

COMPILE_MODE = "default"  # "max-autotune-no-cudagraphs" tunes the GEMMs too: faster, minutes to compile


def _forward_one(model: torch.nn.Module, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    logits, _ = model(token, cache=cache)
    return logits[0, -1]


_compiled: dict[str, object] = {}


def compiled_forward(mode: str = COMPILE_MODE):
    if mode not in _compiled:
        _compiled[mode] = torch.compile(_forward_one, mode=mode, dynamic=False)
    return _compiled[mode]


def choose(logits: torch.Tensor, cfg: GenConfig, noise: torch.Tensor) -> torch.Tensor:
    """The next id as a 0-d tensor, with no random draw inside (so it can live in a graph).

    Sampling by the exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i,
    the same distribution as torch.multinomial (not the same draws).
    """
    if cfg.temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(filtered_logits(logits, cfg), dim=-1)
    return torch.argmax(probs / noise.clamp(min=1e-30), dim=-1)  # a 0 draw must not make 0/0


class Slot:
    """One generation's static cache and its captured graphs."""

    def __init__(self, model: torch.nn.Module, vocab: int) -> None:
        p = next(model.parameters())
        self.model, self.vocab, self.device = model, vocab, p.device
        self.cache = KVCache(model.cfg, 1, model.cfg.block_size, p.device, p.dtype)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=p.device)
        self.noise = torch.ones(vocab, device=p.device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def start(self, chosen: torch.Tensor) -> None:
        """After the eager prefill wrote the prompt: decode from here at the device-side position."""
        self.token.copy_(chosen.view(1, 1))
        self.cache.position.fill_(self.cache.pos)
        self.cache.static = True

    def _body(self, cfg: GenConfig, layout: StatsLayout) -> torch.Tensor:
        logits = compiled_forward()(self.model, self.token, self.cache)[:self.vocab].float()
        chosen = choose(logits, cfg, self.noise)
        out = layout.pack(logits, chosen)
        self.token.copy_(chosen.view(1, 1))
        self.cache.position.add_(1)
        return out

    def _capture(self, cfg: GenConfig, layout: StatsLayout) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up (compiles on first use) on a side stream, then restore what the warm-up changed:
        # it wrote K/V at the current position (the real step overwrites them) and moved the position.
        token, position = self.token.clone(), self.cache.position.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body(cfg, layout)
                self.token.copy_(token)
                self.cache.position.copy_(position)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._body(cfg, layout)
        self.token.copy_(token)
        self.cache.position.copy_(position)
        return graph, out

    def step(self, cfg: GenConfig, layout: StatsLayout, rng: torch.Generator | None) -> list[float]:
        """One decode step: the host copy of the step vector (see StatsLayout)."""
        key = (cfg.temperature, cfg.top_k, cfg.top_p, layout.req)
        with torch.inference_mode():
            if key not in self.graphs:
                self.graphs[key] = self._capture(cfg, layout)
            graph, out = self.graphs[key]
            if cfg.temperature > 0.0:
                self.noise.exponential_(generator=rng)
            graph.replay()
            self.cache.pos += 1
            return out.tolist()


class _Pool:
    def __init__(self) -> None:
        self.free: list[Slot] = []


_pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_pools_lock = threading.Lock()


@contextlib.contextmanager
def acquire_slot(model: torch.nn.Module, vocab: int,
                 guard: contextlib.AbstractContextManager) -> Iterator[Slot]:
    """A free slot of `model` (a new one when all are in use), reset, returned to the pool afterwards."""
    with _pools_lock:
        pool = _pools.setdefault(model, _Pool())
        slot = next((s for s in pool.free if s.vocab == vocab), None)
        if slot is not None:
            pool.free.remove(slot)
    if slot is None:
        with guard:
            slot = Slot(model, vocab)
    with guard:
        slot.cache.reset()
    try:
        yield slot
    finally:
        with guard:
            slot.cache.reset()
        with _pools_lock:
            pool.free.append(slot)
