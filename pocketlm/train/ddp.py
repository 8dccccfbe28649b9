"""Process groups and model wrapping: activation checkpointing, torch.compile, DistributedDataParallel.

`torchrun --nproc_per_node N -m pocketlm train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; then each rank
trains on its own data stream (NCCL on CUDA, gloo on CPU) and rank 0 writes checkpoints and metrics.
On several machines (`torchrun --nnodes M ...`) RANK and WORLD_SIZE count every process of every
node: the data stream and the writing rank go by them; LOCAL_RANK (this node's processes) only picks
the GPU. Without those variables everything here is a no-op around a single process.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from pocketlm import PocketLMError
from pocketlm.model.accel import accelerated


COMPILED_AUTOGRAD = "pocketlm_compiled_autograd"  # set by `wrap` on the compiled module


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
    """This process's device: GPU LOCAL_RANK of its own node under torchrun."""
    if dist.enabled and device.type == "mps":
        raise PocketLMError("several processes cannot share MPS (torch has no process-group backend for it): "
                            "train in one process, or pass --device cpu")
    if device.type == "cuda" and dist.enabled:
        if dist.local_rank >= torch.cuda.device_count():
            raise PocketLMError(f"LOCAL_RANK={dist.local_rank} but this node has {torch.cuda.device_count()} CUDA "
                                "device(s): give torchrun --nproc-per-node at most that many on this node")
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
    overlap the backward (`ddp_graph_split`). Compiling first and wrapping after was slower on 2 H100s
    (docs/LOG.md). With `compiled_autograd` the backward is compiled as well, and DDP's all-reduces
    are traced into it (dynamo's "python_reducer") instead of splitting the forward graph.
    """
    if cfg.checkpointing:
        checkpoint_blocks(model)
    use_compile = accelerated(device, cfg.compile)
    if cfg.compiled_autograd and not use_compile:
        raise PocketLMError("TrainConfig.compiled_autograd needs torch.compile: pass --compile true as well")
    if cfg.ddp_bucket_mb <= 0:
        raise PocketLMError(f"TrainConfig.ddp_bucket_mb={cfg.ddp_bucket_mb}: give a size in MB above 0 (default 25)")
    if use_compile:
        # A process-wide dynamo setting, read by DDP's constructor: how a compiled DDP module is split
        # for the all-reduce.
        torch._dynamo.config.optimize_ddp = ("python_reducer" if cfg.compiled_autograd else
                                             "ddp_optimizer" if cfg.ddp_graph_split else "no_optimization")
    wrapped: nn.Module = model
    if dist.enabled:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          bucket_cap_mb=cfg.ddp_bucket_mb, static_graph=cfg.ddp_static_graph)
    if use_compile:
        # Packed documents through flex attention instead of SDPA's dense mask: 15% faster on an H200,
        # and its compiled gradients equal eager's there (tests/test_graph_decode.py). Only where that
        # was checked: CUDA, one process, no activation checkpointing.
        if device.type == "cuda" and not dist.enabled and not cfg.checkpointing:
            model.use_flex_attention(True)
        wrapped = torch.compile(wrapped)
        setattr(wrapped, COMPILED_AUTOGRAD, cfg.compiled_autograd)
    return wrapped


def maybe_no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-batch's forward and backward: DDP's gradient all-reduce skipped on all
    but the last micro-batch of a step, and compiled autograd around both when `wrap` turned it on
    (the backward is only compiled when it runs inside that context, with its forward)."""
    ctx = contextlib.ExitStack()
    if getattr(model, COMPILED_AUTOGRAD, False):
        from torch._dynamo import compiled_autograd

        ctx.enter_context(compiled_autograd._enable(functools.partial(torch.compile, dynamic=False), dynamic=False))
    inner = getattr(model, "_orig_mod", model)  # through torch.compile's wrapper
    if not sync and isinstance(inner, DistributedDataParallel):
        ctx.enter_context(inner.no_sync())
    return ctx


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


def same_on_every_rank(path: Path, dist: DistInfo) -> None:
    """Fail on every rank, with the fix, when `path` exists on some nodes only: a run folder that is not
    shared would otherwise send the nodes down different branches (resume vs fresh) and hang them."""
    if not dist.enabled:
        return
    seen: list[bool | None] = [None] * dist.world
    td.all_gather_object(seen, path.exists())
    if len(set(seen)) > 1:
        has = [r for r, s in enumerate(seen) if s]
        raise PocketLMError(f"{path} exists for rank(s) {', '.join(map(str, has))} only: every node must see the "
                            "same run folder; put --runs-dir on storage all nodes mount, or copy the run folder "
                            "to each node")


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        td.barrier()


def shutdown(dist: DistInfo) -> None:
    if dist.enabled and td.is_initialized():
        td.destroy_process_group()
