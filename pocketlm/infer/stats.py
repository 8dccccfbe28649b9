"""The inspector's per-step statistics, apart from generation: what to compute on the device for one
step, and the typed record the host gets back.

A step's numbers travel to the host in one fp32 vector (one device->host copy per token); `StatsLayout`
is the only code that knows where each number sits in it. Ids are exact in fp32 (vocabularies are far
below 2**24). Numbers describe the model's own distribution (temperature 1, before top-k/top-p), not
the sampling settings; entropies are in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pocketlm.infer.config import StatsRequest


@dataclass
class TokenStats:
    """What the model thought when it produced one token."""

    logprob: float  # of the chosen token
    entropy: float  # of the full next-token distribution
    top: list[tuple[int, float]]  # the most likely tokens: (id, logprob), best first
    lens: list[list[tuple[int, float]]] | None = None  # per layer: (id, prob), best first
    attn_entropy: list[list[float]] | None = None  # per layer, per head: entropy of the last query
    # With penalties on: the chosen token's logprob after them (temperature 1, before top-k/top-p);
    # `logprob` stays the model's own.
    penalized_logprob: float | None = None


TOPK_BLOCK = 128  # vocabulary entries per block in `topk_blocked`


def topk_blocked(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) over the last dim, in two small selections: the k blocks with the largest
    maxima hold the k largest entries, so only k x TOPK_BLOCK candidates are ranked. On an H200,
    inside a CUDA graph, top-5 of 16,000 took 33 us this way against 64 us for one torch.topk."""
    V = x.shape[-1]
    n = -(-V // TOPK_BLOCK)
    if n <= k:
        return torch.topk(x, k)
    blocks = F.pad(x, (0, n * TOPK_BLOCK - V), value=float("-inf")).unflatten(-1, (n, TOPK_BLOCK))
    best = torch.topk(blocks.amax(-1), k).indices  # [..., k]
    cand = blocks.gather(-2, best.unsqueeze(-1).expand(*best.shape, TOPK_BLOCK)).flatten(-2)
    values, at = torch.topk(cand, k)
    return values, best.gather(-1, at // TOPK_BLOCK) * TOPK_BLOCK + at % TOPK_BLOCK


def token_stats(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """[logprob(chosen), entropy, top-k logprobs..., top-k ids...] of fp32 logits [V], on their device.

    The raw logits are finite, so p * log p never meets -inf.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    # gather, not logp[chosen]: indexing with a tensor reads the index on the host (a sync, and not
    # allowed inside a CUDA graph capture).
    parts = [logp.gather(0, chosen.reshape(1)), entropy.reshape(1)]
    if k > 0:
        values, ids = topk_blocked(logp, k)
        parts += [values, ids.float()]
    return torch.cat(parts)


class StatsLayout:
    """The step vector: [chosen id, then, with a request: token stats, the penalized logprob (with
    penalties on), logit lens, head entropies]."""

    def __init__(self, req: StatsRequest | None, n_layer: int, n_head: int, penalized: bool = False) -> None:
        self.req, self.n_layer, self.n_head, self.penalized = req, n_layer, n_head, penalized

    def pack(self, logits: torch.Tensor, chosen: torch.Tensor, signals: torch.Tensor | None = None,
             penalized: torch.Tensor | None = None) -> torch.Tensor:
        """The step's vector on the device; `signals` from `Signals.compute` when the request has any,
        `penalized` the logits after the penalties when the layout has them."""
        parts = [chosen.float().reshape(1)]
        if self.req is not None:
            parts.append(token_stats(logits, chosen, self.req.top_alternatives))
            if self.penalized:
                parts.append(torch.log_softmax(penalized, dim=-1).gather(0, chosen.reshape(1)))
            if signals is not None:
                parts.append(signals)
        return torch.cat(parts)

    def unpack(self, host: list[float]) -> tuple[int, TokenStats | None]:
        """(chosen id, its statistics or None) from the vector's host copy."""
        tid = int(host[0])
        req = self.req
        if req is None:
            return tid, None
        k = req.top_alternatives
        stats = TokenStats(logprob=host[1], entropy=host[2],
                           top=[(int(i), lp) for lp, i in zip(host[3:3 + k], host[3 + k:3 + 2 * k])])
        rest = host[3 + 2 * k:]
        if self.penalized:
            stats.penalized_logprob, rest = rest[0], rest[1:]
        if req.logit_lens:
            n = self.n_layer * req.lens_top
            probs, ids = rest[:n], rest[n:2 * n]
            stats.lens = [[(int(ids[i]), probs[i]) for i in range(l * req.lens_top, (l + 1) * req.lens_top)]
                          for l in range(self.n_layer)]
            rest = rest[2 * n:]
        if req.attn_entropy:
            stats.attn_entropy = [rest[l * self.n_head:(l + 1) * self.n_head] for l in range(self.n_layer)]
        return tid, stats


class Signals:
    """Hooks that keep the last position's residual (logit lens) and attention row (head entropy),
    and the per-step numbers made from them."""

    def __init__(self, model: torch.nn.Module, req: StatsRequest | None) -> None:
        self.model = model
        self.req = req
        self.captured: dict[str, torch.Tensor] = {}
        self.hooks: list = []
        if req is not None and req.logit_lens:
            def keep_resid(t: torch.Tensor, hook) -> None:
                self.captured[hook.name] = t[0, -1]  # [d_model]
            self.hooks.append((lambda n: n.endswith(".hook_resid_post"), keep_resid))
        if req is not None and req.attn_entropy:
            def keep_pattern(t: torch.Tensor, hook) -> None:
                self.captured[hook.name] = t[0, :, -1].float()  # [head, key_pos]
            self.hooks.append((lambda n: n.endswith(".attn.hook_pattern"), keep_pattern))

    def compute(self, vocab: int) -> torch.Tensor | None:
        """Logit-lens top tokens and head entropies as one flat fp32 vector (None when neither is asked)."""
        req, model = self.req, self.model
        if req is None or not req.needs_hooks:
            return None
        parts = []
        n_layer = model.cfg.n_layer
        if req.logit_lens:
            resid = torch.stack([self.captured[f"blocks.{i}.hook_resid_post"] for i in range(n_layer)])
            # Through the same final norm and unembedding as the real output, so the last layer's lens
            # equals the model's own prediction. Observation only: nothing is folded into the weights.
            probs = torch.softmax(F.linear(model.ln_final(resid), model.embed.weight[:vocab]).float(), dim=-1)
            values, ids = topk_blocked(probs, req.lens_top)
            parts += [values.flatten(), ids.float().flatten()]
        if req.attn_entropy:
            pattern = torch.stack([self.captured[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layer)])
            parts.append(-torch.special.xlogy(pattern, pattern).sum(-1).flatten())
        return torch.cat(parts)
