"""Causal self-attention: one code path for training, prefill and cached decode.

The caller (GPT.forward) decides the masking once per forward and passes it to every layer: either
`is_causal=True` (fast fused kernels), an explicit boolean mask (True = may attend), a flex-attention
`BlockMask` (packed documents on the accelerated path), or neither (single-token decode attends to
everything cached).
With a cache, hook_k/hook_v/hook_rot_k see only the new tokens; scores and pattern span all keys.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from pocketlm.device import is_mps
from pocketlm.model.config import GPTConfig
from pocketlm.model.hooks import HookPoint
from pocketlm.model.norm import RMSNorm
from pocketlm.model.rope import apply_rope

if TYPE_CHECKING:
    from pocketlm.model.kv_cache import KVCache

Mask = Union[torch.Tensor, BlockMask, None]


@torch.compiler.disable
def doc_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """Causal attention within each packed document of doc_ids (B, S), as a flex-attention BlockMask.

    Blocks wholly inside one document run as dense causal tiles, blocks across documents are skipped.
    Built outside the compiled graph (a graph break per forward, ~1 ms): traced into the training
    step's graph, the block mask's sort/index_put kernels failed on an H200 with torch 2.11
    (docs/LOG.md).
    """
    B, S = doc_ids.shape

    def same_doc_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    return create_block_mask(same_doc_causal, B, None, S, S, device=doc_ids.device)


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

    def explicit(self) -> bool:
        """Whether hooks read or edit the scores or pattern, which then have to be materialised."""
        return self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, is_causal: bool,
                attn_mask: Mask, cache: KVCache | None) -> torch.Tensor:
        B, S, C = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.n_head, self.head_dim)
        hooked = any(h.has_hooks() for h in (self.hook_q, self.hook_k, self.hook_rot_q, self.hook_rot_k))
        if hooked or self.q_norm is not None:
            q, k, v = qkv.unbind(2)
            q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q = self.hook_rot_q(apply_rope(q, cos, sin))
            k = self.hook_rot_k(apply_rope(k, cos, sin))
        else:
            # q and k rotated together: half the elementwise kernels of the eager path.
            q, k = apply_rope(qkv[:, :, :2], cos.unsqueeze(2), sin.unsqueeze(2)).unbind(2)
            v = self.hook_v(qkv[:, :, 2])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D) for SDPA
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        mps = is_mps(q.device)
        if self.explicit() or (mps and not sdpa_trusted(q.device)):
            z = self._explicit(q, k, v, is_causal, attn_mask)
        elif isinstance(attn_mask, BlockMask):
            z = flex_attention(q, k, v, block_mask=attn_mask)
        elif mps:  # MPS SDPA kernels were wrong on non-contiguous q/k/v (pytorch#163597)
            z = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=attn_mask,
                                               is_causal=is_causal)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        z = self.hook_z(z.transpose(1, 2))
        return self.out(z.reshape(B, S, C))

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                  attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention with the scores and pattern materialised, for hooks that read or edit them."""
        return explicit_attention(q, k, v, is_causal, attn_mask, self.hook_attn_scores, self.hook_pattern)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                       attn_mask: torch.Tensor | None, on_scores: Callable = lambda t: t,
                       on_pattern: Callable = lambda t: t) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, with the scores and pattern passed through `on_scores`/`on_pattern`."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    scores = on_scores(scores)
    pattern = on_pattern(torch.softmax(scores.float(), dim=-1).to(v.dtype))
    return pattern @ v


_SDPA_TRUSTED: dict[str, bool] = {}  # device -> whether its fused SDPA matched the explicit path


def sdpa_trusted(device: torch.device) -> bool:
    """Whether the device's fused SDPA agrees with `explicit_attention`: checked once per process on a
    small input (KV lengths around a multiple of 32, prefill with a mask and single-token decode, where
    MPS kernels have been wrong: pytorch#163597, PR #169222). When it disagrees, attention takes the
    explicit path on that device, with a warning."""
    key = str(device)
    if key not in _SDPA_TRUSTED:
        _SDPA_TRUSTED[key] = _sdpa_agrees(device)
        if not _SDPA_TRUSTED[key]:
            warnings.warn(f"scaled_dot_product_attention on {device} disagrees with the explicit computation "
                          f"in torch {torch.__version__}; using the explicit path (slower, correct)", stacklevel=2)
    return _SDPA_TRUSTED[key]


def _sdpa_agrees(device: torch.device) -> bool:
    gen = torch.Generator().manual_seed(0)
    # Without autocast: the first forward (which runs this check) may be inside a training step's.
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            for n_keys, n_queries in ((33, 33), (47, 1), (64, 1), (70, 5)):
                q, k, v = (torch.randn(1, 2, n, 16, generator=gen).to(device, dtype)
                           for n in (n_queries, n_keys, n_keys))
                mask = None
                if n_queries > 1:  # the last n_queries of n_keys positions, causally
                    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)
                    mask = torch.arange(n_keys, device=device)[None, :] <= q_pos[:, None]
                fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                if not torch.allclose(fused.float(), explicit_attention(q, k, v, False, mask).float(), atol=tol):
                    return False
    return True
