"""Ops that MPS lacks or gets wrong, for the MPS-rules mode: one entry per known problem, each with
the PyTorch issue or pull request that documents it. The mode fails on an op listed here when the
entry's condition holds. Dtype rules (no float64, no complex) and the threading rule are the mode's
own; this file is only about individual kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

def _always(args: tuple, kwargs: dict) -> bool:
    return True


def _non_contiguous_qkv_before_2_13(args: tuple, kwargs: dict) -> bool:
    from pocketlm.device import TORCH_VERSION

    return TORCH_VERSION < (2, 13) and any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in args[:3])


def _found_inf_before_2_13(args: tuple, kwargs: dict) -> bool:
    from pocketlm.device import TORCH_VERSION

    return TORCH_VERSION < (2, 13) and kwargs.get("found_inf") is not None


@dataclass(frozen=True)
class Gap:
    op: str  # aten op name without the overload, e.g. "aten.multinomial"
    source: str  # where it is documented
    what: str  # what goes wrong, and what to do instead
    applies: Callable[[tuple, dict[str, Any]], bool] = _always


GAPS: tuple[Gap, ...] = (
    Gap("aten.multinomial", "pytorch/pytorch#192577",
        "MPS multinomial can return indices of zero probability; sample on the host"),
    # Fixed for the query in 2.9 and for batched/permuted q/k/v by PR #181151 (2.12): from 2.13 the
    # kernels take any strides with a dense last dim (model/attention.py, fused_attention).
    Gap("aten._scaled_dot_product_attention_math_for_mps", "pytorch/pytorch#163597, #181133",
        "before torch 2.13 MPS SDPA kernels are wrong for non-contiguous q/k/v; make them contiguous",
        _non_contiguous_qkv_before_2_13),
    Gap("aten._scaled_dot_product_flash_attention_for_cpu", "pytorch/pytorch#163597, #181133",
        "(the CPU stand-in for MPS SDPA) before torch 2.13 non-contiguous q/k/v are wrong on MPS; make them "
        "contiguous", _non_contiguous_qkv_before_2_13),
    Gap("aten._fused_adam_", "pytorch/pytorch#186360",
        "before torch 2.13 the fused MPS Adam ignores found_inf and applies overflowed steps; skip on the host",
        _found_inf_before_2_13),
    Gap("aten._fused_adamw_", "pytorch/pytorch#186360",
        "before torch 2.13 the fused MPS AdamW ignores found_inf and applies overflowed steps; skip on the host",
        _found_inf_before_2_13),
)

BY_OP: dict[str, Gap] = {g.op: g for g in GAPS}
