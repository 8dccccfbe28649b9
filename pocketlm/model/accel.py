"""The one switch for the CUDA-only speed-ups: torch.compile of the training step, flex attention for
packed documents, and decoding through a captured CUDA graph.

Unset (None), the switch is on for CUDA devices only, so MPS and CPU run the plain eager path unless
someone asks for it explicitly (tests do, on CPU). `POCKETLM_ACCEL=0` turns it off everywhere, for
comparisons and for debugging a suspected compiler problem.
"""

from __future__ import annotations

import os

import torch


def accelerated(device: torch.device, requested: bool | None = None) -> bool:
    """Whether to take the accelerated path on `device`; an explicit True/False always wins."""
    if requested is not None:
        return requested
    return device.type == "cuda" and os.environ.get("POCKETLM_ACCEL", "1") != "0"
