"""Process groups and model wrapping: activation checkpointing, torch.compile, DistributedDataParallel.

`torchrun --nproc_per_node N -m pocketlm train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; then each rank
trains on its own data stream (NCCL on CUDA, gloo on CPU) and rank 0 writes checkpoints and metrics.
Without those variables everything here is a no-op around a single process.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from pocketlm.model.accel import accelerated


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (single process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def device_for(device: torch.device, dist: DistInfo) -> torch.device:
    if device.type == "cuda" and dist.enabled:
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return device


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    Patches the block instances' forward (not the module tree), so parameter names and the saved
    weights stay the same.
    """
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def wrap(model: nn.Module, cfg, device: torch.device, dist: DistInfo) -> nn.Module:
    """The module the training step calls; `model` itself stays the unwrapped one that is saved.

    DDP first, then compiled: dynamo splits the graph at DDP's gradient buckets so their all-reduces
    overlap the backward. Compiling first and wrapping after was slower on 2 H100s (docs/LOG.md).
    """
    if cfg.checkpointing:
        checkpoint_blocks(model)
    wrapped: nn.Module = model
    if dist.enabled:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if accelerated(device, cfg.compile):
        # Packed documents keep SDPA's dense mask: flex attention (`model.use_flex_attention`) was
        # 15% faster on an H200 but its compiled result is not yet verified (docs/LOG.md).
        wrapped = torch.compile(wrapped)
    return wrapped


def maybe_no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    inner = getattr(model, "_orig_mod", model)  # through torch.compile's wrapper
    if sync or not isinstance(inner, DistributedDataParallel):
        return contextlib.nullcontext()
    return inner.no_sync()


def _reduce(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.enabled:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_reduce_count(n: int, device: torch.device, dist: DistInfo) -> int | torch.Tensor:
    """The sum of `n` over ranks, at least 1: an int in one process, else a device tensor (not read on
    the host, so the step does not wait; `torch.full` is a fill kernel, not a blocking copy)."""
    if not dist.enabled:
        return max(1, n)
    return _reduce(torch.full((), n, dtype=torch.float32, device=device), dist).clamp_min_(1)


def all_reduce_float(t: torch.Tensor, dist: DistInfo) -> float:
    return float(_reduce(t.detach().clone(), dist))


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        td.barrier()


def shutdown(dist: DistInfo) -> None:
    if dist.enabled and td.is_initialized():
        td.destroy_process_group()
