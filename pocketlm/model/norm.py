"""RMSNorm, computed in fp32 whatever the activation dtype (the HF Llama convention, so logits match it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.model.hooks import HookPoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.hook_normalized = HookPoint()  # [batch, pos, d_model], before the learned gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Squares of bf16/fp16 activations overflow or lose precision: F.rms_norm accumulates in fp32
        # whatever the input dtype and rounds once on output (one fused kernel on CUDA, where the
        # hand-written form was five), which is what HF's fp32 round trip computes.
        normed = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * self.hook_normalized(normed)
