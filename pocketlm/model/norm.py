"""RMSNorm, computed in fp32 whatever the activation dtype (the HF Llama convention, so logits match it)."""

from __future__ import annotations

import torch
from torch import nn

from pocketlm.model.hooks import HookPoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.hook_normalized = HookPoint()  # [batch, pos, d_model], before the learned gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # Squares of bf16/fp16 activations overflow or lose precision; normalise in fp32, cast back.
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight * self.hook_normalized(normed)
