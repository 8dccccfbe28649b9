"""Choosing the next token from a row of logits (the inspector's statistics are in `infer/stats.py`).

`GenConfig` (in `infer/config.py`, torch-free for the CLI) is re-exported here.

Tensor functions and the per-request penalty counts: no model, no tokenizer, no host syncs. Everything
stays on the logits' device so the decode loop can fetch all of a step's numbers in one transfer; the
exception is sampling on MPS, which draws on the host. Order: penalties, then temperature, top-k, top-p.
"""

from __future__ import annotations

import torch

from pocketlm.device import is_mps
from pocketlm.infer.config import GenConfig
from pocketlm.mps_rules import on_host

# Temperatures below this sample greedily: their limit is the argmax, and logits / 1e-300 overflow to inf.
GREEDY_BELOW = 1e-6


class Penalties:
    """Penalties on tokens already seen, as per-request counts on the logits' device (no host syncs).

    - repeat (llama.cpp's `repeat_penalty` over the last `repeat_last_n` tokens, the prompt included;
      `llama_sampler_penalties_apply` in ggml-org/llama.cpp src/llama-sampling.cpp): a logit of a token
      in that window is divided by the penalty when positive, multiplied by it otherwise.
    - frequency / presence (the OpenAI API's): logit[j] -= c[j] * frequency + (c[j] > 0) * presence,
      where c[j] counts how often token j was *sampled* in this reply so far (the prompt is not counted:
      OpenAI defines c[j] as how often the token was sampled before the current position).
    The repeat penalty comes first, then the additive ones, in llama.cpp's order.

    The window is a ring of the last N ids (slots not yet filled hold the id `vocab`, which counts into
    a spare last bin); `recent` counts the ids in the ring. The ring position is a host int: it only
    depends on the step number, never on a token.
    """

    def __init__(self, cfg: GenConfig, prompt_ids: list[int], vocab: int, context: int,
                 device: torch.device) -> None:
        self.cfg, self.vocab = cfg, vocab
        self.counts = torch.zeros(vocab, device=device)  # sampled tokens of this reply, for frequency/presence
        self.one = torch.ones(1, device=device)
        self.window = self.recent = None
        if cfg.repeat_on:
            # A generation never holds more than `context` tokens: a longer window is the whole of it.
            n = context if cfg.repeat_last_n == -1 else min(cfg.repeat_last_n, context)
            last = prompt_ids[-n:]
            self.window = torch.tensor([vocab] * (n - len(last)) + last, dtype=torch.long, device=device)
            self.recent = torch.zeros(vocab + 1, device=device)
            self.recent.index_add_(0, self.window, torch.ones(n, device=device))
            self.at = 0  # the oldest slot: the next token replaces it

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The penalized fp32 logits [V] (a new tensor; `logits` is left as it was)."""
        cfg, x = self.cfg, logits
        if self.recent is not None:
            scaled = torch.where(x > 0, x / cfg.repeat_penalty, x * cfg.repeat_penalty)
            x = torch.where(self.recent[:self.vocab] > 0, scaled, x)
        if cfg.frequency_penalty != 0.0 or cfg.presence_penalty != 0.0:
            x = x - self.counts * cfg.frequency_penalty - (self.counts > 0).float() * cfg.presence_penalty
        return x

    def update(self, chosen: torch.Tensor) -> None:
        """Count the chosen id (a 0-d tensor on the device)."""
        ids = chosen.reshape(1)
        self.counts.index_add_(0, ids, self.one)
        if self.recent is not None:
            slot = slice(self.at, self.at + 1)
            self.recent.index_add_(0, self.window[slot], -self.one)
            self.recent.index_add_(0, ids, self.one)
            self.window[slot] = ids
            self.at = (self.at + 1) % self.window.numel()


def filtered_logits(logits: torch.Tensor, cfg: GenConfig) -> torch.Tensor:
    """Apply temperature, top-k and top-p to fp32 logits [V]; excluded tokens become -inf.

    Only called when temperature > 0 (greedy never looks at this).
    """
    x = logits / cfg.temperature
    if 0 < cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Mass strictly before each token: the most likely token is always kept, so the set is never empty.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= cfg.top_p
        drop_sorted[0] = False  # even when top_p rounds to 0 in fp32 (e.g. 4e-172, found by the API fuzz)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample_next(logits: torch.Tensor, cfg: GenConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The chosen token id as a 0-d int64 tensor on the logits' device (no host sync here, except on MPS)."""
    if cfg.temperature < GREEDY_BELOW:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(filtered_logits(logits, cfg), dim=-1)
    if not is_mps(logits.device):
        return torch.multinomial(probs, 1, generator=generator)[0]
    # MPS multinomial can return an index of zero probability (pytorch#192577), i.e. a token top-k/top-p
    # removed: draw on the host from the row's 16k floats (with the host generator of make_generator).
    host = probs.cpu()
    with on_host():
        return torch.multinomial(host, 1, generator=generator)[0].to(logits.device)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A per-request generator, so concurrent requests never share (or disturb) random state. On MPS
    it is a host generator, since sampling happens on the host there."""
    if seed is None:
        return None
    g = torch.Generator(device="cpu" if is_mps(device) else device)
    g.manual_seed(seed)
    return g
