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

from pocketlm.device import TORCH_VERSION, is_mps
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
        if self.explicit() or (is_mps(q.device) and not sdpa_trusted(q.device, self.head_dim, self.n_head, q.dtype)):
            z = self._explicit(q, k, v, is_causal, attn_mask)
        elif isinstance(attn_mask, BlockMask):
            z = flex_attention(q, k, v, block_mask=attn_mask)
        else:
            z = fused_attention(q, k, v, attn_mask, is_causal)
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


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                    is_causal: bool) -> torch.Tensor:
    """`F.scaled_dot_product_attention` as the model calls it. q is a transposed view and, with a KV cache,
    k/v are views of the cache (a prefix of its slots). MPS SDPA read such strided inputs wrongly before
    torch 2.12/2.13 (pytorch#163597, fixed for the query in 2.9; #181133, fixed by PR #181151 for 2.12):
    there they are copied first. From 2.13 the kernels take the strides (only the last dim must be dense,
    which it is), so a decode step no longer copies every layer's whole K/V prefix; `sdpa_trusted` checks
    exactly this layout on the device at start-up."""
    if is_mps(q.device) and TORCH_VERSION < (2, 13):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


# The self-check's KV lengths: below, above and at multiples of 32 (MPS kernels have been wrong off a
# multiple of 32: pytorch PR #169222); its short query blocks: one token (decode) and up to 8 (the
# vector kernels' limit), the shapes where MPS takes its fast kernels for head_dim 64/96/128/256.
SELF_CHECK_KV_LENGTHS = (31, 33, 64, 95)
SELF_CHECK_QUERIES = (1, 8)
_SELF_CHECK_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
_SDPA_TRUSTED: dict[tuple[str, int, int, torch.dtype], bool] = {}  # (device, head_dim, n_head, dtype) -> agrees


def sdpa_trusted(device: torch.device, head_dim: int, n_head: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the device's fused SDPA agrees with `explicit_attention` at this attention shape and dtype:
    checked once per process and shape (`sdpa_self_check`). When it disagrees, attention takes the
    explicit path for that shape, with a warning."""
    key = (str(device), head_dim, n_head, dtype)
    if key not in _SDPA_TRUSTED:
        wrong = [c for c in sdpa_self_check(device, head_dim, n_head, dtype) if not c["ok"]]
        _SDPA_TRUSTED[key] = not wrong
        if wrong:
            cases = ", ".join(f"{c['case']} q={c['queries']} kv={c['kv_len']} (max error {c['max_error']:.3g})"
                              for c in wrong)
            warnings.warn(f"scaled_dot_product_attention on {device} disagrees with the explicit computation "
                          f"at head_dim {head_dim}, {n_head} heads, {dtype} in torch {torch.__version__}: {cases}; "
                          "using the explicit path (slower, correct)", stacklevel=2)
    return _SDPA_TRUSTED[key]


def sdpa_self_check(device: torch.device, head_dim: int, n_head: int, dtype: torch.dtype = torch.float32,
                    kv_lengths: tuple[int, ...] = SELF_CHECK_KV_LENGTHS) -> list[dict]:
    """`fused_attention` against `explicit_attention` in fp32, laid out as the model lays them out (q a
    transposed view, k/v a prefix of a longer cache), for each KV length: prefill (causal, as many
    queries as keys), one-query decode (no mask) and a block of up to 8 queries after a filled cache
    (boolean mask). One dict per case: case, queries, kv_len, max_error, tol, ok."""
    gen = torch.Generator().manual_seed(0)
    tol = _SELF_CHECK_TOL.get(dtype, 2e-2)
    slots = max(kv_lengths) + 32  # the cache is longer than any prefix read from it
    cases = []
    # Without autocast: the first forward (which runs this check) may be inside a training step's.
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        k_all, v_all = (torch.randn(1, n_head, slots, head_dim, generator=gen).to(device, dtype) for _ in range(2))
        for n_keys in kv_lengths:
            k, v = k_all[:, :, :n_keys], v_all[:, :, :n_keys]
            for case, n_queries in (("prefill", n_keys), *(("decode", min(n, n_keys)) for n in SELF_CHECK_QUERIES)):
                q = torch.randn(1, n_queries, n_head, head_dim, generator=gen).to(device, dtype).transpose(1, 2)
                mask, causal = None, case == "prefill"
                if case == "decode" and n_queries > 1:  # the last n_queries of n_keys positions, causally
                    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)
                    mask = torch.arange(n_keys, device=device)[None, :] <= q_pos[:, None]
                fused = fused_attention(q, k, v, mask, causal).float()
                ref = explicit_attention(q.float(), k.float(), v.float(), causal, mask).float()
                err = float((fused - ref).abs().max())  # NaN compares False below: not ok
                cases.append({"case": case, "queries": n_queries, "kv_len": n_keys, "max_error": err, "tol": tol,
                              "ok": err <= tol})
    return cases
