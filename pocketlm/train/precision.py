"""Dtype, autocast and loss scaling of training (which device, and what "auto" precision means per
device, live in `pocketlm.device`, shared with inference and serving).

- fp16 always comes with a GradScaler; bf16 and fp32 need none.
- fp16 falls back to fp32 by itself when overflow-skipped steps keep coming (the scaler cannot help).
- peak FLOPS per device for MFU: a table, "unknown" (None) for anything not in it.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import re
import subprocess
import sys
from dataclasses import dataclass

import torch

from pocketlm import PocketLMError
from pocketlm.device import TORCH_VERSION, auto_precision, is_mps

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Consecutive overflow-skipped steps after which fp16 is given up for fp32: the scale has then dropped
# 2**10-fold, so the overflow is in the forward values themselves, not in a too-high loss scale.
MAX_SKIPPED_STEPS = 10

# Dense peak TFLOP/s for the training dtype (no sparsity). Apple GPUs run fp16 at the fp32 rate.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM; PCIe parts report "H100 PCIe" below
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6},
    "Apple M4 Max": {"bf16": 18.4, "fp16": 18.4, "fp32": 18.4},
    "Apple M4 Pro": {"bf16": 9.2, "fp16": 9.2, "fp32": 9.2},
}
# A base M4's GPU is not in the table: published figures are 3.76-4.1 TFLOP/s for the 10-core part and
# about 3.0 for the 8-core one, so ~0.38 a core, read from the system; the lower figure when unknown.
M4_TFLOPS_PER_GPU_CORE = 0.38
M4_TFLOPS_UNKNOWN_CORES = 3.0


def resolve_precision(device: torch.device, requested: str = "auto") -> str:
    if requested not in PRECISIONS:
        raise PocketLMError(f"TrainConfig.precision={requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    return auto_precision(device.type)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return out.stdout.strip() or "Apple (unknown chip)"
    return platform.processor() or platform.machine() or "cpu"


def gpu_cores(report: str) -> int | None:
    """The GPU core count in `system_profiler SPDisplaysDataType` ("Total Number of Cores: 10") or
    `ioreg` ("gpu-core-count" = 10) output; None when it says neither."""
    m = re.search(r"Total Number of Cores:\s*(\d+)", report) or re.search(r'"gpu-core-count"\s*=\s*(\d+)', report)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None


@functools.cache  # system_profiler takes seconds; training asks at every log line
def apple_gpu_cores() -> int | None:
    """This Mac's GPU core count, or None (not a Mac, or neither tool answered in time): never raises."""
    if sys.platform != "darwin":
        return None
    for cmd in (["system_profiler", "SPDisplaysDataType"], ["ioreg", "-rc", "AGXAccelerator", "-d", "1"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.SubprocessError, ValueError):
            continue
        cores = gpu_cores(out.stdout or "")
        if cores:
            return cores
    return None


def peak_flops(name: str, precision: str) -> float | None:
    """Peak FLOP/s of the named device for `precision`, or None ("unknown") when not in the table; a base
    M4's from its GPU core count (Apple GPUs run fp16 and bf16 at the fp32 rate)."""
    if re.search(r"Apple M4(?! (Pro|Max))", name):
        cores = apple_gpu_cores()
        return (M4_TFLOPS_PER_GPU_CORE * cores if cores else M4_TFLOPS_UNKNOWN_CORES) * 1e12
    # Longest key first, so "H100 PCIe" wins over "H100" and "Apple M4 Max" over "Apple M4".
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key][precision] * 1e12
    return None


@dataclass
class Precision:
    """The live precision state of one run; `fall_back_to_fp32` is the only transition."""

    device: torch.device
    mode: str  # fp32 | bf16 | fp16
    scaler: torch.amp.GradScaler
    skipped_in_a_row: int = 0

    @classmethod
    def create(cls, device: torch.device, mode: str) -> Precision:
        if mode == "bf16" and is_mps(device) and TORCH_VERSION < (2, 6):
            # Older autocast on MPS silently ran bf16 requests in fp32.
            raise PocketLMError(f"precision bf16 on MPS needs torch 2.6+ (this is {torch.__version__}); "
                                "use --precision fp16 or fp32, or install the pinned torch")
        if mode == "bf16" and device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
            raise PocketLMError("precision bf16 needs macOS 14+ on MPS; use --precision fp16 or fp32")
        return cls(device, mode, torch.amp.GradScaler(device.type, enabled=(mode == "fp16")))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.mode])

    def after_step(self, finite: bool) -> bool:
        """Record whether the step's gradients were finite; True when fp16 was just given up."""
        if finite or self.mode != "fp16":
            self.skipped_in_a_row = 0
            return False
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row < MAX_SKIPPED_STEPS:
            return False
        self.mode = "fp32"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.skipped_in_a_row = 0
        return True

    def state_dict(self) -> dict:
        return {"mode": self.mode, "scaler": self.scaler.state_dict(), "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: a run that gave fp16 up stays in fp32; a run moved to another device keeps
        this device's precision (the scaler state only carries over from fp16 to fp16)."""
        if self.mode == "fp16" and state["mode"] == "fp32":
            self.mode = "fp32"
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        if self.mode == state["mode"] == "fp16":
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_in_a_row = state["skipped_in_a_row"] if self.mode == state["mode"] else 0
