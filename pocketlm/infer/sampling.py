"""Choosing the next token from a row of logits (the inspector's statistics are in `infer/stats.py`).

`GenConfig` (in `infer/config.py`, torch-free for the CLI) is re-exported here.

Pure tensor functions: no model, no tokenizer, no host syncs. Everything stays on the logits'
device so the decode loop can fetch all of a step's numbers in one transfer; the exception is
sampling on MPS, which draws on the host.
"""

from __future__ import annotations

import torch

from pocketlm.device import is_mps
from pocketlm.infer.config import GenConfig
from pocketlm.mps_rules import on_host

# Temperatures below this sample greedily: their limit is the argmax, and logits / 1e-300 overflow to inf.
GREEDY_BELOW = 1e-6


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
