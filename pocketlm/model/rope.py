"""Rotary position embeddings in the half-split (`rotate_half`) layout used by HF Llama.

Dimension i of a head is paired with dimension i + D/2 (not with its neighbour, as in the interleaved
layout), so q/k projection weights map to `LlamaForCausalLM` without any permutation.
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm import PocketLMError
from pocketlm.mps_rules import on_host


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) in fp32, with each frequency repeated across the two halves.

    Angles are computed in fp64 so the table is exact to fp32 rounding even at long positions; that is
    host work (MPS has no fp64): the fp32 tables move to the device with the module.
    """
    with on_host():
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, pos, head, D) by per-position tables cos/sin (batch or 1, pos, 1, D)."""
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables for positions [0, length); `extend` grows them on request."""

    def __init__(self, head_dim: int, length: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        cos, sin = rope_tables(head_dim, length, theta)
        # Not persistent: derived from the config, so checkpoints don't carry them.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def length(self) -> int:
        return self.cos.shape[0]

    def extend(self, length: int) -> None:
        """Rebuild the tables for `length` positions (on the current device and dtype)."""
        if length > self.length:
            cos, sin = rope_tables(self.head_dim, length, self.theta)
            self.cos = cos.to(self.cos)
            self.sin = sin.to(self.sin)

    def forward(self, start: int, seq_len: int,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables shaped (B or 1, seq_len, 1, D) for explicit `positions` (B, T) or for start + arange(T).

        Explicit positions are gathered on the device without a range check (that would sync with the
        host); callers keep them below `length`.
        """
        if positions is not None:
            return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)
        if start + seq_len > self.length:
            raise PocketLMError(f"positions up to {start + seq_len} exceed the RoPE table ({self.length}); "
                                "call model.extend_context(n) first or use a shorter sequence")
        return (self.cos[start:start + seq_len][None, :, None, :],
                self.sin[start:start + seq_len][None, :, None, :])
