"""Which device and which precision: shared by training, inference and serving.

- `pick_device`: cuda > mps > cpu for "auto", or the one named by `--device`.
- `AUTO_PRECISION`: what precision "auto" means per device type (the one home of that choice):
  CUDA bf16 autocast; MPS fp16 autocast + GradScaler (bf16 is slow or missing on many macOS
  versions); CPU fp32.
- `is_mps`: whether a code path must follow MPS's rules (an MPS device, or any device while the
  MPS-rules test mode is on, so that mode exercises the MPS branches).
- `to_device`: host->device copies that are asynchronous only where that is safe.
- `DeviceLock`: the lock that gives one thread at a time the device.
- `limit_mps_memory`: fail fast instead of swapping when a run overshoots Metal's working set.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from pocketlm import PocketLMError, mps_rules

TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
AUTO_PRECISION = {"cuda": "bf16", "mps": "fp16", "cpu": "fp32"}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cuda", "mps", "cpu") and not name.startswith("cuda:"):
        raise PocketLMError(f"--device {name!r}: use auto, cuda, cuda:N, mps or cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PocketLMError("--device cuda but no CUDA GPU is visible; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PocketLMError("--device mps but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def auto_precision(device_type: str) -> str:
    return AUTO_PRECISION.get(device_type, "fp32")


def is_mps(device: torch.device) -> bool:
    return device.type == "mps" or mps_rules.active()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t.to(device)`, asynchronous only for CUDA from pinned memory. Elsewhere an asynchronous copy
    from pageable memory may read the buffer after the host has reused it (MPS: pytorch#139550)."""
    return t.to(device, non_blocking=device.type == "cuda" and t.is_pinned())


class DeviceLock:
    """A lock for the device: MPS crashes when two threads run MPS ops at once (pytorch#197805), so
    every thread that shares a model does all its device work while holding one of these. The
    MPS-rules mode knows who holds it and fails on device work from any other thread meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> DeviceLock:
        self._lock.acquire()
        mps_rules.lock_taken(self)
        return self

    def __exit__(self, *exc: object) -> None:
        mps_rules.lock_released(self)
        self._lock.release()


def limit_mps_memory(device: torch.device, log: Callable[[str], None] = print) -> None:
    """On MPS: log Metal's recommended working set and what the driver holds, and cap this process at
    the recommended working set, so an overshoot raises an out-of-memory error instead of swapping
    (by default MPS lets a process grow well past it)."""
    if device.type != "mps":
        return
    gib = 1 << 30
    log(f"MPS: recommended working set {torch.mps.recommended_max_memory() / gib:.2f} GiB, "
        f"driver holds {torch.mps.driver_allocated_memory() / gib:.2f} GiB; capping this process at the "
        "recommended working set")
    torch.mps.set_per_process_memory_fraction(1.0)  # a fraction of the recommended working set
