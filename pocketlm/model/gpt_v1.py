"""The v1 model: a pre-norm Llama-style decoder (RMSNorm, RoPE, SwiGLU, tied embeddings, no biases).

One `forward` serves training (optionally packed rows with per-document masking), prefill and
single-token decode with a KVCache. There is no separate inference copy. The forward never reads a
tensor value on the host (no `.item()`, no branching on tensor data), so it stays friendly to CUDA
graphs and `torch.compile`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import PocketLMError
from pocketlm.format import IGNORE_INDEX
from pocketlm.model.attention import CausalSelfAttention, Mask, doc_block_mask
from pocketlm.model.config import GPTConfig
from pocketlm.model.hooks import HookedModule, HookPoint
from pocketlm.model.loss import linear_cross_entropy_sum
from pocketlm.model.mlp import SwiGLU
from pocketlm.model.norm import RMSNorm
from pocketlm.model.rope import RotaryEmbedding

if TYPE_CHECKING:
    from pocketlm.model.kv_cache import KVCache


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        # Registration order is forward order, so model.hook_names() lists hooks as they fire.
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.ln2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, is_causal: bool,
                attn_mask: Mask, cache: KVCache | None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        attn = self.attn(self.ln1(x), cos, sin, is_causal=is_causal, attn_mask=attn_mask, cache=cache)
        x = self.hook_resid_mid(x + self.hook_attn_out(attn))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(x))))


class GPT(HookedModule):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # also the output projection (tied)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_final = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        # Packed documents through flex attention (a block-sparse kernel that keeps the flash speed)
        # instead of SDPA with a dense mask. Only worth it compiled: see `use_flex_attention`.
        self.flex_attention = False
        self.reset_parameters()
        self.setup_hooks()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices; residual projections scaled by 1/sqrt(2L) (GPT-2) so the
        residual stream's variance does not grow with depth; RMSNorm gains start at 1."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                is_residual = name.endswith(("attn.out.weight", "mlp.down.weight"))
                nn.init.normal_(p, mean=0.0, std=residual_std if is_residual else self.cfg.init_std)
            else:
                nn.init.ones_(p)

    def num_params(self) -> int:
        """Trainable parameters, the tied embedding counted once (33,890,816 for v1)."""
        return sum(p.numel() for p in self.parameters())

    def use_flex_attention(self, on: bool = True) -> None:
        """Mask packed documents with flex attention. Eager flex attention is slow (it runs unfused),
        so the accelerated path (`model/accel.py`) turns this on together with torch.compile."""
        self.flex_attention = on

    def extend_context(self, length: int) -> None:
        """Allow positions up to `length` (beyond block_size, the model was not trained there)."""
        self.rope.extend(length)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                cache: KVCache | None = None,
                return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, S) token ids -> (fp32 logits (B, S, V), mean fp32 loss over targets != -100 or None).

        positions (B, S): RoPE position ids; default start + arange(S), start = cache.pos or 0.
        doc_ids (B, S): a token attends only to earlier tokens with the same id (packed documents).
        cache: keys/values of earlier tokens; this call appends S tokens to it (a static cache: one
        token at its device-side position).
        return_logits=False with targets: the loss alone (logits None), never holding the batch's fp32
        logits: chunk by chunk in eager mode (`model/loss.py`), fused by inductor when compiled.
        """
        B, S = idx.shape
        static = cache is not None and cache.static
        start = 0 if cache is None or static else cache.pos
        if cache is not None and doc_ids is not None:
            raise PocketLMError("doc_ids cannot be combined with a KV cache; generate one document per row")
        if static:
            if S != 1:
                raise PocketLMError(f"a static KV cache takes one token per forward, got {S}; prefill with it unset")
            positions = cache.position.view(1, 1).expand(B, 1)
        x = self.hook_embed(self.embed(idx))
        # The tables once per forward, in the dtype q and k will have (autocast's when it is on).
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self.rope(start, S, positions, dtype)
        is_causal, attn_mask = self._attention_mask(S, start, doc_ids, cache, idx.device)
        for block in self.blocks:
            x = block(x, cos, sin, is_causal=is_causal, attn_mask=attn_mask, cache=cache)
        if cache is not None:
            cache.advance(S)
        h = self.ln_final(x)
        if targets is not None and not return_logits:
            flat = targets.reshape(-1)
            if torch.compiler.is_compiling():
                # Compiled, the plain loss: inductor fuses the cast and the softmax into its kernels, and
                # the logits are no output, so no fp32 copy reaches memory. The chunked Function traced
                # into the graph gave zero gradients on an H200 with torch 2.11 (right on the CPU).
                logits = F.linear(h, self.embed.weight).float().view(-1, self.cfg.vocab_size)
                total = F.cross_entropy(logits, flat, ignore_index=IGNORE_INDEX, reduction="sum")
            else:
                total = linear_cross_entropy_sum(h.reshape(B * S, -1), self.embed.weight, flat)
            return None, total / (flat != IGNORE_INDEX).sum().clamp(min=1)
        logits = F.linear(h, self.embed.weight).float()
        if targets is None:
            return logits, None
        flat = targets.reshape(-1)
        total = F.cross_entropy(logits.view(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX, reduction="sum")
        # Divide by the count on the device (no host sync); clamp so a fully masked batch gives 0, not NaN.
        return logits, total / (flat != IGNORE_INDEX).sum().clamp(min=1)

    def _attention_mask(self, S: int, start: int, doc_ids: torch.Tensor | None, cache: KVCache | None,
                        device: torch.device) -> tuple[bool, Mask]:
        if cache is not None and cache.static:
            return False, cache.static_mask()
        # Hooks on scores/pattern need a dense mask; asked only when flex attention is on (not per decode step).
        if doc_ids is not None and self.flex_attention and not any(b.attn.explicit() for b in self.blocks):
            return False, doc_block_mask(doc_ids)
        return _attention_mask(S, start, doc_ids, cache is not None, device)


def _attention_mask(S: int, start: int, doc_ids: torch.Tensor | None, cached: bool,
                    device: torch.device) -> tuple[bool, torch.Tensor | None]:
    """(is_causal, boolean mask broadcastable to (B, H, S, start+S)); True in the mask = may attend."""
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        return False, (same_doc & causal).unsqueeze(1)
    if cached and S == 1:
        return False, None  # the one new token may see everything cached, itself included
    if cached and start > 0:
        # A chunk after a filled cache: query i sits at absolute position start + i.
        q_pos = torch.arange(start, start + S, device=device)
        return False, torch.arange(start + S, device=device)[None, :] <= q_pos[:, None]
    return True, None
