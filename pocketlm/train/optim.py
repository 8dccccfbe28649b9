"""AdamW with the usual split: weight decay on matrices only, never on norms, biases or embeddings."""

from __future__ import annotations

import torch
from torch import nn

from pocketlm.device import TORCH_VERSION, is_mps

try:  # private in torch: when it moves, fall back to the device that has had fused AdamW longest
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:
    def _get_fused_kernels_supported_devices() -> list[str]:
        return ["cuda"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and undecayed norms/biases/embeddings (tied weights count once)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, beta2: float,
                device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, beta2), eps=1e-8,
                             fused=fused_trusted(device))


def fused_trusted(device: torch.device) -> bool:
    """Whether to use the fused kernel (one launch for all parameters; CUDA, MPS and CPU in recent torch).

    Before torch 2.13 the fused MPS kernel ignores `found_inf` (fixed by pytorch PR #186360), so an
    overflowed step would be applied: there the unfused optimizer is used, and the loop and GradScaler
    skip non-finite steps from the host.
    """
    if is_mps(device) and TORCH_VERSION < (2, 13):
        return False
    return device.type in _get_fused_kernels_supported_devices()
