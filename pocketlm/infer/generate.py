"""Generation with a KV cache: one prefill forward over the prompt, then one forward per new token.

Batch size is 1: one prompt, one sequence, one KVCache per call (concurrent callers each get their
own cache; a shared `lock` serialises their device work). Stops on the `<|eot|>` id only, never on text.
Each new token is yielded as a `Step` with what the inspector shows; all of a step's numbers come
back from the device in one transfer (the chosen id is needed on the host anyway, to test for eot).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pocketlm import PocketLMError
from pocketlm.infer.detok import StreamDecoder
from pocketlm.infer.kv_cache import KVCache
from pocketlm.infer.sampling import GenConfig, make_generator, sample_next, step_stats


@dataclass
class Step:
    """One generated token. Logprobs and entropy are in nats, from the model's raw distribution
    (temperature 1, before top-k/top-p); the signals are from the forward that produced its logits."""

    index: int  # 0 for the first new token
    id: int
    bytes: bytes  # the UTF-8 bytes this token stands for (b"" for special tokens)
    text: str  # text that became complete with this token; "" while a character is still split
    logprob: float
    entropy: float  # of the full next-token distribution
    top: list[tuple[int, float]]  # the most likely tokens: (id, logprob), best first
    cache_len: int  # tokens in the KV cache after the forward that produced this token's logits
    cache_bytes: int  # bytes of K/V those tokens occupy
    ms: float  # wall time of this step: forward, sampling, statistics (step 0's forward is the prefill)
    lens: list[list[tuple[int, float]]] | None = None  # per layer: (id, prob), best first
    attn_entropy: list[list[float]] | None = None  # per layer, per head: entropy of the last query, nats


@dataclass
class Prefill:
    """The prompt's forward. `ms` runs until the first token is chosen: the time to first token."""

    n_tokens: int
    ms: float
    cache_len: int
    cache_bytes: int


class Generation:
    """An iterator of Steps; `prefill` is set by the first `next()` and `finish_reason`
    ("eot", "length" or "cancelled") once the iterator is exhausted."""

    def __init__(self, steps: Callable[[Generation], Iterator[Step]]) -> None:
        self.prefill: Prefill | None = None
        self.finish_reason: str | None = None
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


def generate(model: torch.nn.Module, tok, prompt_ids: list[int], cfg: GenConfig,
             on_step: Callable[[Step], None] | None = None, *, cancel: threading.Event | None = None,
             lock: threading.Lock | None = None) -> Generation:
    """Generate after `prompt_ids`. `cancel` stops before the next token; `lock` (a DeviceLock when
    threads share the model) is held for all of a step's device work: forward, sampling, statistics."""
    cfg.validate()
    block = model.cfg.block_size
    if not 0 < len(prompt_ids) <= block:
        raise PocketLMError(f"prompt is {len(prompt_ids)} tokens; it must be 1..{block} (the model's context)")
    guard = lock if lock is not None else contextlib.nullcontext()

    def steps(gen: Generation) -> Iterator[Step]:
        param = next(model.parameters())
        with guard:  # all device work holds the lock: MPS crashes with two threads at once (pytorch#197805)
            # The last token is never fed back, so prompt + max_new_tokens positions always suffice.
            cache = KVCache(model.cfg, 1, min(block, len(prompt_ids) + cfg.max_new_tokens), param.device,
                            param.dtype)
            rng = make_generator(cfg.seed, param.device)
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)
        bytes_per_pos = cache.nbytes // cache.max_len
        detok = StreamDecoder(tok)
        hooks, captured = _signal_hooks(model, cfg)
        n_layer, n_head, k = model.cfg.n_layer, model.cfg.n_head, cfg.top_alternatives

        def device_step(ids: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
            """Forward, sampling and the step's numbers on the host, under the lock and without autograd."""
            with guard, torch.inference_mode(), model.hooks(hooks):
                logits, _ = model(ids, cache=cache)
                # A vocabulary padded past the tokenizer's ids is cut: those ids could never be decoded.
                logits = logits[0, -1, :tok.vocab_size].float()
                signals = _signals(model, captured, cfg, tok.vocab_size)
                ids = sample_next(logits, cfg, rng).view(1, 1)
                return ids, torch.cat([step_stats(logits, ids[0, 0], k), signals]).tolist()

        for index in range(cfg.max_new_tokens):
            t0 = time.perf_counter()
            ids, host = device_step(ids)
            ms = (time.perf_counter() - t0) * 1e3
            if index == 0:
                gen.prefill = Prefill(len(prompt_ids), ms, cache.pos, cache.pos * bytes_per_pos)
            else:
                gen.decode_ms += ms
            gen.n_tokens += 1
            tid = int(host[0])
            step = Step(index=index, id=tid, bytes=tok.id_to_bytes(tid),
                        text="" if tid == tok.eot_id else detok.push(tid), logprob=host[1], entropy=host[2],
                        top=[(int(i), lp) for lp, i in zip(host[3:3 + k], host[3 + k:3 + 2 * k])],
                        cache_len=cache.pos, cache_bytes=cache.pos * bytes_per_pos, ms=ms,
                        **_unpack_signals(host[3 + 2 * k:], cfg, n_layer, n_head))
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


def _signal_hooks(model: torch.nn.Module, cfg: GenConfig) -> tuple[list, dict[str, torch.Tensor]]:
    """Hooks that keep the last position's residual (logit lens) and attention row (head entropy)."""
    captured: dict[str, torch.Tensor] = {}
    hooks: list = []
    if cfg.logit_lens:
        def keep_resid(t: torch.Tensor, hook) -> None:
            captured[hook.name] = t[0, -1]  # [d_model]
        hooks.append((lambda n: n.endswith(".hook_resid_post"), keep_resid))
    if cfg.attn_entropy:
        def keep_pattern(t: torch.Tensor, hook) -> None:
            captured[hook.name] = t[0, :, -1].float()  # [head, key_pos]
        hooks.append((lambda n: n.endswith(".attn.hook_pattern"), keep_pattern))
    return hooks, captured


def _signals(model: torch.nn.Module, captured: dict[str, torch.Tensor], cfg: GenConfig, vocab: int) -> torch.Tensor:
    """Logit-lens top tokens and head entropies as one flat fp32 vector (empty when neither is asked)."""
    parts = []
    n_layer = model.cfg.n_layer
    if cfg.logit_lens:
        resid = torch.stack([captured[f"blocks.{i}.hook_resid_post"] for i in range(n_layer)])
        # Through the same final norm and unembedding as the real output, so the last layer's lens
        # equals the model's own prediction. Observation only: nothing is folded into the weights.
        probs = torch.softmax(F.linear(model.ln_final(resid), model.embed.weight[:vocab]).float(), dim=-1)
        top = torch.topk(probs, cfg.lens_top)
        parts += [top.values.flatten(), top.indices.float().flatten()]
    if cfg.attn_entropy:
        pattern = torch.stack([captured[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layer)])
        parts.append(-torch.special.xlogy(pattern, pattern).sum(-1).flatten())
    if not parts:
        return torch.empty(0, device=next(model.parameters()).device)
    return torch.cat(parts)


def _unpack_signals(flat: list[float], cfg: GenConfig, n_layer: int, n_head: int) -> dict:
    out: dict = {}
    if cfg.logit_lens:
        n = n_layer * cfg.lens_top
        probs, ids = flat[:n], flat[n:2 * n]
        out["lens"] = [[(int(ids[i]), probs[i]) for i in range(l * cfg.lens_top, (l + 1) * cfg.lens_top)]
                       for l in range(n_layer)]
        flat = flat[2 * n:]
    if cfg.attn_entropy:
        out["attn_entropy"] = [flat[l * n_head:(l + 1) * n_head] for l in range(n_layer)]
    return out
