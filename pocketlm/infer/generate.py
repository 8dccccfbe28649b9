"""Generation with a KV cache: one prefill forward over the prompt, then one forward per new token.

Batch size is 1: one prompt, one sequence, one KVCache per call (concurrent callers each get their
own cache; a shared `lock` serialises their device work). Stops on the `<|eot|>` id only, never on text.
Each new token is yielded as a `Step`; its statistics (`infer/stats.py`) come only when the caller
asks for them with a `StatsRequest`. A step's numbers come back from the device in one transfer (the
chosen id is needed on the host anyway, to test for eot).

Two decode paths, the same tokens for greedy decoding:
- eager: one model forward per token, the way every device runs it;
- graph (CUDA, `model/accel.py`'s switch): the decode step, sampling and statistics included, is one
  captured CUDA graph replayed per token (`infer/graph_decode.py`). A request that needs hooks (the
  logit lens, attention entropy, or hooks someone attached to the model) or penalties (repeat,
  frequency, presence) stays eager, and `Generation.path` says why.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pocketlm import PocketLMError
from pocketlm.infer.config import StatsRequest
from pocketlm.infer.detok import StreamDecoder
from pocketlm.infer.sampling import GenConfig, Penalties, make_generator, sample_next
from pocketlm.infer.stats import Signals, StatsLayout, TokenStats
from pocketlm.model.accel import accelerated
from pocketlm.model.kv_cache import KVCache


@dataclass
class Step:
    """One generated token, with its statistics when they were asked for."""

    index: int  # 0 for the first new token
    id: int
    bytes: bytes  # the UTF-8 bytes this token stands for (b"" for special tokens)
    text: str  # text that became complete with this token; "" while a character is still split
    cache_len: int  # tokens in the KV cache after the forward that produced this token's logits
    cache_bytes: int  # bytes of K/V those tokens occupy
    ms: float  # wall time of this step: forward, sampling, statistics (step 0's forward is the prefill)
    stats: TokenStats | None = None


@dataclass
class Prefill:
    """The prompt's forward. `ms` runs until the first token is chosen: the time to first token."""

    n_tokens: int
    ms: float
    cache_len: int
    cache_bytes: int


class Generation:
    """An iterator of Steps; `prefill` is set by the first `next()` and `finish_reason`
    ("eot", "length" or "cancelled") once the iterator is exhausted. `path` is "graph" or
    "eager", with the reason when the accelerated path was wanted but not taken."""

    def __init__(self, steps: Callable[[Generation], Iterator[Step]]) -> None:
        self.prefill: Prefill | None = None
        self.finish_reason: str | None = None
        self.path = "eager"
        self.n_tokens = 0
        self.decode_ms = 0.0  # steps after the first; the first one's time is the prefill's
        self._it = steps(self)

    @property
    def decode_tok_s(self) -> float:
        return (self.n_tokens - 1) / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> Step:
        return next(self._it)


PENALTIES_EAGER = "eager (penalties keep per-request token counts, which the captured graph does not have)"


def decode_path(model: torch.nn.Module, stats: StatsRequest | None, accel: bool | None,
                cfg: GenConfig | None = None) -> str:
    """"graph", "eager", or "eager (why the graph path was not taken)"."""
    device = next(model.parameters()).device
    if not accelerated(device, accel):
        return "eager"
    if cfg is not None and cfg.penalized:
        return PENALTIES_EAGER
    if device.type != "cuda":
        return "eager (CUDA graphs need a CUDA device)"
    if stats is not None and stats.needs_hooks:
        return "eager (the logit lens and attention entropy read activations through hooks)"
    if any(h.has_hooks() for h in model.hook_dict.values()):
        return "eager (hooks are attached to the model)"
    return "graph"


def generate(model: torch.nn.Module, tok, prompt_ids: list[int], cfg: GenConfig,
             on_step: Callable[[Step], None] | None = None, *, stats: StatsRequest | None = None,
             cancel: threading.Event | None = None, lock: threading.Lock | None = None,
             accel: bool | None = None) -> Generation:
    """Generate after `prompt_ids`. `stats`: what to report per token (None: nothing, the fastest).
    `cancel` stops before the next token; `lock` (a DeviceLock when threads share the model) is held
    for all of a step's device work: forward, sampling, statistics. `accel` overrides the switch."""
    cfg.validate()
    if stats is not None:
        stats.validate()
    block = model.cfg.block_size
    if not 0 < len(prompt_ids) <= block:
        raise PocketLMError(f"prompt is {len(prompt_ids)} tokens; it must be 1..{block} (the model's context)")
    guard = lock if lock is not None else contextlib.nullcontext()
    path = decode_path(model, stats, accel, cfg)
    layout = StatsLayout(stats, model.cfg.n_layer, model.cfg.n_head, penalized=cfg.penalized)
    vocab = tok.vocab_size

    def steps(gen: Generation) -> Iterator[Step]:
        gen.path = path
        param = next(model.parameters())
        detok = StreamDecoder(tok)
        signals = Signals(model, stats)
        with contextlib.ExitStack() as stack:
            if path == "graph":
                from pocketlm.infer.graph_decode import acquire_slot

                slot = stack.enter_context(acquire_slot(model, vocab, guard))
                cache = slot.cache
            with guard:  # all device work holds the lock: MPS crashes with two threads at once (pytorch#197805)
                rng = make_generator(cfg.seed, param.device)
                ids = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)
                penalties = Penalties(cfg, prompt_ids, vocab, block, param.device) if cfg.penalized else None
                if path != "graph":
                    # The last token is never fed back, so prompt + max_new_tokens positions always suffice.
                    cache = KVCache(model.cfg, 1, min(block, len(prompt_ids) + cfg.max_new_tokens), param.device,
                                    param.dtype)
            bytes_per_pos = cache.nbytes // cache.max_len

            def eager_step(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
                """Forward, choice and statistics with no autograd anywhere, all under the lock:
                (chosen id, the next forward's input, host vector)."""
                with guard, torch.inference_mode(), model.hooks(signals.hooks):
                    logits, _ = model(ids, cache=cache)
                    # A vocabulary padded past the tokenizer's ids is cut: those ids could never be decoded.
                    logits = logits[0, -1, :vocab].float()
                    if penalties is None:  # the exact unpenalized path
                        chosen = sample_next(logits, cfg, rng)
                        return chosen, chosen.view(1, 1), layout.pack(logits, chosen, signals.compute(vocab)).tolist()
                    penalized = penalties.apply(logits)
                    chosen = sample_next(penalized, cfg, rng)
                    penalties.update(chosen)
                    host = layout.pack(logits, chosen, signals.compute(vocab), penalized).tolist()
                    return chosen, chosen.view(1, 1), host

            for index in range(cfg.max_new_tokens):
                t0 = time.perf_counter()
                if path == "graph" and index > 0:
                    with guard:  # replays (and a first capture) are forwards too: one at a time
                        host = slot.step(cfg, layout, rng)
                else:
                    chosen, ids, host = eager_step(ids)
                    if path == "graph":
                        with guard:
                            slot.start(chosen)  # the prompt is in; later tokens go through the graph
                ms = (time.perf_counter() - t0) * 1e3
                if index == 0:
                    gen.prefill = Prefill(len(prompt_ids), ms, cache.pos, cache.pos * bytes_per_pos)
                else:
                    gen.decode_ms += ms
                gen.n_tokens += 1
                tid, token_stats = layout.unpack(host)
                step = Step(index=index, id=tid, bytes=tok.id_to_bytes(tid),
                            text="" if tid == tok.eot_id else detok.push(tid), cache_len=cache.pos,
                            cache_bytes=cache.pos * bytes_per_pos, ms=ms, stats=token_stats)
                if on_step is not None:
                    on_step(step)
                yield step
                if tid == tok.eot_id:
                    gen.finish_reason = "eot"
                    return
                if index + 1 == cfg.max_new_tokens or cache.pos >= block:
                    gen.finish_reason = "length"
                    return
                if cancel is not None and cancel.is_set():
                    gen.finish_reason = "cancelled"
                    return

    return Generation(steps)
