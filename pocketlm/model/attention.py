"""Causal self-attention: one code path for training, prefill and cached decode.

The caller (GPT.forward) decides the masking once per forward and passes it to every layer: either
`is_causal=True` (fast fused kernels), an explicit boolean mask (True = may attend), or neither
(single-token decode attends to everything cached).
With a cache, hook_k/hook_v/hook_rot_k see only the new tokens; scores and pattern span all keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.model.config import GPTConfig
from pocketlm.model.hooks import HookPoint
from pocketlm.model.norm import RMSNorm
from pocketlm.model.rope import apply_rope

if TYPE_CHECKING:
    from pocketlm.infer.kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        # Rows [0,C) -> q, [C,2C) -> k, [2C,3C) -> v: one matmul instead of three.
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.out = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        # Optional QK-norm (as in OLMo 2, Qwen 3, modded-nanogpt): bounds the attention logits.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_rot_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_rot_k = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos], masked = -inf
        self.hook_pattern = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, is_causal: bool,
                attn_mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, self.head_dim).unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # Tables in the activation dtype (as HF does), so autocast never mixes fp32 q/k with bf16 v.
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = self.hook_rot_q(apply_rope(q, cos, sin))
        k = self.hook_rot_k(apply_rope(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D) for SDPA
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            z = self._explicit(q, k, v, is_causal, attn_mask)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        z = self.hook_z(z.transpose(1, 2))
        return self.out(z.reshape(B, S, C))

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                  attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention with the scores and pattern materialised, for hooks that read or edit them."""
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        if is_causal:
            attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(torch.softmax(scores.float(), dim=-1).to(v.dtype))
        return pattern @ v
