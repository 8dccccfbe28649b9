"""The training loop shared by both phases: accumulate, clip, step, log, evaluate, checkpoint, snapshot.

Data indexing: optimizer step s runs accum_steps micro-batches on each of `world` ranks, and micro-batch
m of rank r is `data.batch(s, micro_batch, rank=r*accum+m, world=world*accum)`. Accumulation slots are
thus virtual ranks: 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches read the same rows, and the
sampler's position is just the step number.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pocketlm import PocketLMError
from pocketlm.device import to_device
from pocketlm.format import IGNORE_INDEX
from pocketlm.train import ddp, metrics
from pocketlm.train.checkpoint import rng_state, save_checkpoint, save_snapshot, set_rng_state, snapshot_interval
from pocketlm.train.config import TrainConfig, config_dict, warmup_for
from pocketlm.train.evaluate import evaluate, greedy_text, pooled
from pocketlm.train.muon import build_optimizer, set_lr
from pocketlm.train.precision import MAX_SKIPPED_STEPS, Precision, device_name, peak_flops, resolve_precision
from pocketlm.train.prefetch import Prefetcher
from pocketlm.train.schedule import lr_at


@dataclass
class Phase:
    name: str  # pretrain | sft
    steps: int
    peak_lr: float
    train: Any  # has batch(step, batch_size, rank, world) -> Batch
    val: dict[str, Any]  # source -> data with val_batches(batch_size, max_batches)
    judged_by: tuple[str, ...]  # sources whose pooled val loss decides best/
    prompts: list[list[int]] = field(default_factory=list)  # token ids of the fixed sample prompts


@dataclass
class RunContext:
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    tok: Any  # pocketlm Tokenizer
    dist: ddp.DistInfo
    log: Callable[[str], None] = print
    tensorboard: metrics.TensorBoard | None = None  # set by run_phase for its phase when cfg.tensorboard

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def record(self, rec: dict[str, Any]) -> None:
        """A metrics line (rank 0 only), and its scalars in TensorBoard when asked for."""
        if self.dist.rank != 0:
            return
        metrics.append(self.metrics_path, rec)
        if self.tensorboard is not None:
            self.tensorboard.add(rec)


def status_kib(field: str) -> int | None:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in KiB (Linux), else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident size: VmHWM on Linux (which `pocketlm doctor` can reset), else
    ru_maxrss (bytes on macOS)."""
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_gib(device: torch.device) -> float:
    """Memory the run holds, in GiB: CUDA's peak allocated tensors, what the MPS driver holds, or the
    process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    return peak_rss_bytes() / 2**30


def micro_batches(data: Any, step: int, micro_batch: int, accum: int, rank: int = 0, world: int = 1) -> list[dict]:
    return [data.batch(step, micro_batch, rank=rank * accum + m, world=world * accum) for m in range(accum)]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batches: list[dict], prec: Precision,
               grad_clip: float, device: torch.device, dist: ddp.DistInfo,
               z_loss: float = 0.0, eot: tuple[int, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `batches` (this rank's micro-batches), without waiting for the device.

    Each micro-batch's mean loss is weighted by its share of the global batch's target tokens, so the
    gradient is the token mean over the whole global batch whatever the split into micro-batches and
    ranks (SFT rows carry very different numbers of assistant tokens). Returns (this rank's share of
    the global mean loss, global grad norm before clipping), both device tensors. A step whose
    gradient is not finite changes nothing: GradScaler skips it in fp16, the optimizer's `found_inf`
    in bf16/fp32 (fused AdamW, MuonAdamW), both decided on the device. z_loss > 0 adds
    z_loss * mean(logsumexp(logits)^2) over the targets (keeps the logits' scale in check; the returned
    loss stays the cross-entropy alone). eot = (id, weight): targets equal to id count `weight` times in
    the token mean (the returned loss stays unweighted).
    """
    eot_extra = eot[1] - 1.0 if eot is not None else 0.0
    counts = [int((b["y"] != IGNORE_INDEX).sum()) for b in batches]  # CPU tensors: no device sync
    n_global = ddp.all_reduce_count(sum(counts), device, dist)
    loss_share = torch.zeros((), device=device)
    for i, (b, n) in enumerate(zip(batches, counts)):
        last = i == len(batches) - 1
        with ddp.maybe_no_sync(model, sync=last):
            with prec.autocast():
                y = to_device(b["y"], device)
                # z-loss needs the logits; without it the loss never holds the batch's fp32 logits.
                logits, loss = model(to_device(b["x"], device), y, positions=to_device(b["positions"], device),
                                     doc_ids=to_device(b["doc_ids"], device),
                                     return_logits=bool(z_loss) or bool(eot_extra))
            objective = loss + z_loss * z_penalty(logits, y) if z_loss else loss
            if eot_extra:
                objective = objective + eot_extra * eot_loss_sum(logits, y, eot[0]) / max(n, 1)
            # DDP averages gradients over ranks, hence the factor world to get a global token sum.
            prec.scaler.scale(objective * (n * dist.world / n_global)).backward()
        loss_share += loss.detach() * (n / n_global)
    prec.scaler.unscale_(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if prec.scaler.is_enabled():
        prec.scaler.step(opt)  # skips an overflowed step: through found_inf where the optimizer takes it
        prec.scaler.update()
    elif getattr(opt, "_step_supports_amp_scaling", False):  # fused AdamW, MuonAdamW
        opt.found_inf = (~torch.isfinite(grad_norm)).float()  # the step skips the update when 1
        opt.step()
    elif math.isfinite(float(grad_norm)):  # unfused optimizers can only skip from the host
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_share, grad_norm


def eot_loss_sum(logits: torch.Tensor, y: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Sum of the cross-entropy over the targets equal to `eot_id`, without a host sync."""
    at = (y == eot_id).float()
    ce = torch.logsumexp(logits.float(), -1) - logits[..., eot_id].float()
    return (ce * at).sum()


def z_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean(logsumexp(logits)^2) over the target positions, without a host sync."""
    valid = (y != IGNORE_INDEX).float()
    return (torch.logsumexp(logits.float(), -1).square() * valid).sum() / valid.sum().clamp(min=1)


def flops_per_token(model_cfg: Any, n_params: int, seq_len: int) -> float:
    """6N for the matmuls with the weights, 12·L·C·T for attention scores and values (fwd + bwd)."""
    return 6 * n_params + 12 * model_cfg.n_layer * model_cfg.n_embd * seq_len


class Meter:
    """What a log line reports: mean loss and the count of non-finite steps (both summed on the device,
    read at the line), the last grad norm, tokens/s, ms/step, fp16 steps skipped."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int32, device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.nonfinite.zero_()
        self.steps = self.tokens = self.skipped = 0
        self.t0 = time.perf_counter()

    def add(self, loss_share: torch.Tensor, grad_norm: torch.Tensor, tokens: int, skipped: bool) -> None:
        self.loss += loss_share
        self.nonfinite += ~torch.isfinite(grad_norm)
        self.grad_norm = grad_norm
        self.steps += 1
        self.tokens += tokens
        self.skipped += skipped  # fp16 steps the loss scaler dropped

    def read(self, dist: ddp.DistInfo) -> dict[str, float]:
        """The line's numbers; reading them is the host sync of a log step."""
        dt = time.perf_counter() - self.t0
        return {"loss": ddp.all_reduce_float(self.loss, dist) / self.steps, "tok_per_s": self.tokens / dt,
                "dt_ms": 1000 * dt / self.steps, "skipped": self.skipped, "grad_norm": float(self.grad_norm),
                "nonfinite": int(self.nonfinite) - self.skipped}  # the ones fp16's scaler did not handle


def eot_weighting(cfg: TrainConfig, phase: str, tok: Any) -> tuple[int, float] | None:
    """(eot id, weight) for train_step when the SFT phase weighs its <|eot|> targets; None otherwise."""
    if phase != "sft" or cfg.sft_eot_weight == 1.0:
        return None
    if not 0.0 <= cfg.sft_eot_weight <= 100.0:
        raise PocketLMError(f"sft_eot_weight must be in [0, 100] (1 = as any token), got {cfg.sft_eot_weight}")
    return tok.eot_id, cfg.sft_eot_weight


def run_phase(run: RunContext, phase: Phase, model: nn.Module, tokenizer_path: Path,
              state: dict[str, Any] | None = None) -> float:
    """Train `model` (unwrapped, on run.device) through `phase`, from `state` when resuming.

    Returns the best validation loss. Saves `phase/last` at every evaluation, `phase/best` when
    the validation loss improves and a snapshot every `snapshot_interval` evaluations; rank 0 writes,
    the others wait.
    """
    cfg, dist, device = run.cfg, run.dist, run.device
    phase_dir = run.run_dir / phase.name
    opt = build_optimizer(model, cfg, phase.peak_lr, device)
    prec = Precision.create(device, resolve_precision(device, cfg.precision))
    step, best, stale = 0, math.inf, 0  # stale: evaluations in a row without a better validation loss
    warmup = warmup_for(cfg, phase.steps)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        prec.load_state_dict(state["precision"])
        step, best, stale = state["step"], state["best_val"], state.get("stale_evals", 0)
        set_rng_state(state["rng"])
    train_model = ddp.wrap(model, cfg, device, dist)

    fpt = flops_per_token(model.cfg, sum(p.numel() for p in model.parameters()), cfg.seq_len)
    chip = device_name(device)
    bar = tqdm(total=phase.steps, initial=step, desc=phase.name, disable=dist.rank != 0, dynamic_ncols=True)
    meter = Meter(device)
    snap_every = snapshot_interval(cfg.snapshot_every, cfg.snapshot_max, phase.steps, cfg.eval_every)
    eot = eot_weighting(cfg, phase.name, run.tok)
    if cfg.tensorboard and dist.rank == 0:
        # purge_step: a resumed phase hides the events a killed run wrote past its checkpoint.
        run.tensorboard = metrics.TensorBoard(run.run_dir, phase.name, purge_step=step + 1 if state else None)

    def save(kind: str, val_loss: float) -> None:
        if dist.rank == 0:
            meta = {"phase": phase.name, "step": step, "val_loss": val_loss, "train_config": config_dict(cfg),
                    "special_ids": run.tok.special_token_ids()}
            st = {"optimizer": opt.state_dict(), "precision": prec.state_dict(), "step": step,
                  "best_val": best, "stale_evals": stale, "rng": rng_state(), "data_position": step, "config": config_dict(cfg)}
            save_checkpoint(phase_dir, kind, model, tokenizer_path, meta, st)
        ddp.barrier(dist)

    def snapshot(val_loss: float) -> None:
        if dist.rank == 0:
            meta = {"phase": phase.name, "step": step, "val_loss": val_loss, "train_config": config_dict(cfg),
                    "special_ids": run.tok.special_token_ids()}
            path = save_snapshot(phase_dir, model, tokenizer_path, meta)
            run.record({"kind": "snapshot", "step": step, "phase": phase.name, "val_loss": val_loss,
                        "path": path.relative_to(run.run_dir).as_posix()})
        ddp.barrier(dist)

    # Each rank builds its own micro-batches of the next steps while this one trains.
    prefetch = Prefetcher(lambda s: micro_batches(phase.train, s, cfg.micro_batch, cfg.accum_steps, dist.rank,
                                                  dist.world), step, phase.steps, device)
    try:  # close the bar also when the run stops with an error, so the message is not garbled
        while step < phase.steps:
            lr = lr_at(step, phase.peak_lr, phase.steps, warmup, cfg.min_lr_frac, cfg.schedule, cfg.decay_frac)
            set_lr(opt, lr)
            batches = prefetch.get(step)
            loss_share, grad_norm = train_step(train_model, opt, batches, prec, cfg.grad_clip, device, dist,
                                               cfg.z_loss, eot)
            # fp16 reads every step's grad norm to count the skipped steps in a row (the one wait for the
            # device a step on that path; the optimizers skip on the device); bf16/fp32 never wait here:
            # their non-finite steps, skipped on the device, are counted there and stop the run at the
            # next log line.
            skipped = prec.scaler.is_enabled() and not math.isfinite(float(grad_norm))
            if prec.after_step(not skipped):
                run.log(f"{phase.name} step {step + 1}: fp16 overflowed {MAX_SKIPPED_STEPS} steps in a row; "
                        "continuing in fp32")
            step += 1
            meter.add(loss_share, grad_norm, sum(b["x"].numel() for b in batches) * dist.world, skipped)
            bar.update(1)
            evaluating = step % cfg.eval_every == 0 or step == phase.steps
            # A line at every checkpoint too: a resumed run then averages the same steps per line, and
            # a non-finite step is caught before the checkpoint after it is written.
            if step % cfg.log_every == 0 or evaluating:
                first = step - meter.steps + 1  # the line's first step
                rec = {"kind": "train", "step": step, "phase": phase.name, "lr": lr, **meter.read(dist),
                       "precision": prec.mode, "steps": phase.steps, "mem_gib": memory_gib(device),
                       "time": time.time()}
                if rec.pop("nonfinite"):
                    last = phase_dir / "last"
                    raise PocketLMError(
                        f"non-finite loss or gradient in {phase.name} steps {first}-{step} in {prec.mode} (those "
                        f"updates were skipped); last good checkpoint: {last if last.exists() else 'none'}; "
                        "lower --lr or --grad-clip and resume from it")
                peak = peak_flops(chip, prec.mode)
                rec["mfu"] = rec["tok_per_s"] * fpt / (peak * dist.world) if peak else None
                run.record(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_per_s']:,.0f}",
                                mfu="unknown" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%")
                meter.reset()
            if evaluating:
                val = run_eval(run, phase, model, step, prec)
                stale = 0 if val < best else stale + 1
                if val < best:
                    best = val
                    save("best", val)
                save("last", val)
                if snap_every and math.ceil(step / cfg.eval_every) % snap_every == 0:
                    snapshot(val)
                meter.reset()  # evaluation time is not training throughput
                if cfg.patience and stale >= cfg.patience and step < phase.steps:
                    run.log(f"{phase.name}: stopped early at step {step} of {phase.steps}: validation loss has not "
                            f"improved on {best:.4f} for {stale} evaluations (patience {cfg.patience}, every "
                            f"{cfg.eval_every} steps); best/ holds the best model")
                    run.record({"kind": "stop", "step": step, "phase": phase.name, "best_val": best,
                                "stale_evals": stale})
                    break
    finally:
        prefetch.close()  # also on an early stop or an error: no worker outlives the phase
        bar.close()
        if run.tensorboard is not None:
            run.tensorboard.close()
            run.tensorboard = None
    return best


def run_eval(run: RunContext, phase: Phase, model: nn.Module, step: int, prec: Precision) -> float:
    """Evaluate every validation source, write eval and sample lines; returns the judged val loss."""
    cfg = run.cfg
    byte_lengths = run.tok.token_byte_lengths()
    results = {}
    for source, data in phase.val.items():
        batches = data.val_batches(cfg.micro_batch, cfg.eval_batches)
        results[source] = evaluate(model, batches, byte_lengths, run.device, prec.autocast())
    val = pooled(results[s] for s in phase.judged_by)
    if run.dist.rank == 0:
        for source, r in results.items():
            run.record({"kind": "eval", "step": step, "phase": phase.name, "source": source, "loss": r.loss,
                        "bpb": r.bpb, "tokens": r.tokens})
        run.record({"kind": "eval", "step": step, "phase": phase.name, "source": "all", "loss": val})
        summary = " ".join(f"{s}={r.loss:.3f}/{r.bpb:.3f}bpb" for s, r in results.items())
        run.log(f"[{phase.name} step {step}] val loss {val:.4f} | {summary}")
        for ids in phase.prompts[: 3 if cfg.sample_tokens else 0]:
            prompt, text = run.tok.decode(ids), greedy_text(model, run.tok, ids, cfg.sample_tokens)
            run.record({"kind": "sample", "step": step, "phase": phase.name, "prompt": prompt, "text": text})
            run.log(f"  {prompt!r} -> {text!r}")
    return val

