"""The run's budget, read from the data: steps from --tokens or --epochs, passes over each source, the
estimated time, and warnings when the plan repeats the data more than a few times.

Printed before training starts, so a run that would memorise its corpus says so before it spends the
night doing it. The time is an estimate, evaluations not counted: on CUDA and MPS FLOPs per token over
the device's peak times a typical share of that peak (MFU) measured or reported for this kind of
device; on the CPU, where no such share is known, a few forward + backward passes timed on the spot.
Peaks come from train/precision.py (an M4's from its GPU core count when the system reports it).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pocketlm import PocketLMError
from pocketlm.cache.shards import Cache
from pocketlm.train.config import TrainConfig, warmup_for
from pocketlm.train.precision import peak_flops
from pocketlm.train.pretrain import parse_mix

# Passes over a source past which the plan warns: on this project's FineWeb sample the v1 model's
# validation loss stopped improving after a few passes and then rose fast (docs/LOG.md).
MAX_PASSES = 4.0
# Typical model FLOP utilisation: CUDA measured here (v1, bf16: 22-23% compiled on an H100, 12-13% eager on
# an H200); MPS from peers' reports on Apple GPUs (30-50%; the low end, eager PyTorch). CPU: no estimate.
TYPICAL_MFU = {("cuda", True): 0.22, ("cuda", False): 0.13, ("mps", False): 0.30, ("mps", True): 0.30}
# CPU: forward + backward passes timed (after one untimed) for the time estimate, the median taken (a
# shared machine's neighbours make single passes jump), on at most TIMED_TOKENS tokens of the micro-batch.
TIMED_PASSES = 3
TIMED_TOKENS = 1024
ASSUMED = "typical MFU, not measured"


@dataclass(frozen=True)
class PhaseBudget:
    name: str
    steps: int
    warmup: int
    tokens: int
    passes: dict[str, float]  # source -> tokens drawn from it / its training tokens


def tokens_per_step(cfg: TrainConfig, world: int = 1) -> int:
    return cfg.micro_batch * cfg.accum_steps * world * cfg.seq_len


def train_tokens(cache_dir: str | Path, sources: list[str]) -> dict[str, int]:
    cache = Cache(cache_dir, verify="size")
    return {s: cache.stream(s, "train").n_tokens for s in sources if s in cache.meta["sources"]}


def resolve_steps(cfg: TrainConfig, world: int = 1) -> TrainConfig:
    """pretrain_steps from, first that applies: the token budget (tokens > 0), pretrain_steps as given,
    passes over the pretrain mixture's train split (epochs)."""
    if cfg.tokens < 0 or cfg.epochs < 0:
        raise PocketLMError("TrainConfig.tokens and .epochs must be >= 0")
    per_step = tokens_per_step(cfg, world)
    if cfg.tokens > 0:
        budget = cfg.tokens
    elif cfg.pretrain_steps is not None:
        return cfg
    elif cfg.epochs > 0:
        sizes = train_tokens(cfg.cache, list(parse_mix(cfg.pretrain_mix)))
        budget = cfg.epochs * sum(sizes.values())
    else:
        raise PocketLMError("no pretrain length: give --tokens, --pretrain-steps or --epochs (> 0)")
    return dataclasses.replace(cfg, pretrain_steps=max(1, math.ceil(budget / per_step)))


def phase_budget(cfg: TrainConfig, name: str, world: int = 1) -> PhaseBudget:
    mix = parse_mix(cfg.pretrain_mix if name == "pretrain" else cfg.sft_sources)
    steps = cfg.pretrain_steps if name == "pretrain" else cfg.sft_steps
    tokens = steps * tokens_per_step(cfg, world)
    sizes = train_tokens(cfg.cache, list(mix))
    total_w = sum(mix[s] for s in sizes) or 1.0
    passes = {s: tokens * mix[s] / total_w / n for s, n in sizes.items() if n}
    return PhaseBudget(name, steps, warmup_for(cfg, steps), tokens, passes)


def estimate_tok_per_s(flops_per_token: float, chip: str, precision: str, device_type: str,
                       compiled: bool) -> float | None:
    p, mfu = peak_flops(chip, precision), TYPICAL_MFU.get((device_type, compiled))
    return p * mfu / flops_per_token if p and mfu else None


def timed_tok_per_s(model_cfg: Any, seq_len: int, rows: int, precision: str, device: torch.device) -> float:
    """Tokens/s of forward + backward on `rows` rows of `seq_len` tokens (one document a row, the masked
    path training takes): the median of TIMED_PASSES passes after an untimed one; no optimizer step."""
    from pocketlm.model import GPT
    from pocketlm.train.precision import Precision

    with torch.random.fork_rng(devices=[]):  # the run's own initialisation draws stay as they were
        model = GPT(model_cfg).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model_cfg.vocab_size, (rows, seq_len), generator=gen).to(device)
    doc_ids = torch.zeros_like(x)
    prec = Precision.create(device, precision)
    seconds = []
    for _ in range(TIMED_PASSES + 1):
        start = time.perf_counter()
        with prec.autocast():
            _, loss = model(x, x, doc_ids=doc_ids, return_logits=False)
        loss.backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return rows * seq_len / statistics.median(seconds[1:])


def estimate_speed(model_cfg: Any, seq_len: int, micro_batch: int, device: torch.device, precision: str,
                   compiled: bool) -> tuple[float | None, str]:
    """(tokens/s or None, how it was obtained) for the run's time estimate."""
    from pocketlm.train.loop import flops_per_token
    from pocketlm.train.plan import n_params
    from pocketlm.train.precision import device_name

    if device.type == "cpu":
        rows = max(1, min(micro_batch, TIMED_TOKENS // seq_len))
        return (timed_tok_per_s(model_cfg, seq_len, rows, precision, device),
                f"timed here: median of {TIMED_PASSES} forward+backward passes of {rows} x {seq_len} tokens, "
                "optimizer and evaluations not counted")
    return estimate_tok_per_s(flops_per_token(model_cfg, n_params(model_cfg), seq_len), device_name(device),
                              precision, device.type, compiled), ASSUMED


def describe_budget(phases: list[PhaseBudget], tok_per_s: float | None, chip: str, patience: int,
                    eval_every: int, basis: str = ASSUMED) -> list[str]:
    """The plan as printed lines, warnings last; `basis` says where tok_per_s comes from."""
    lines, warnings = [], []
    for p in phases:
        per_source = ", ".join(f"{s} {x:.2f}" for s, x in sorted(p.passes.items()))
        time = f"~{_duration(p.tokens / tok_per_s)} (estimate)" if tok_per_s else "unknown on this device"
        lines.append(f"plan {p.name}: {p.steps:,} steps ({p.warmup} warmup) x {p.tokens // max(1, p.steps):,} "
                     f"tokens = {p.tokens:,} tokens; passes: {per_source}; time {time}")
        for s, x in sorted(p.passes.items()):
            if x > MAX_PASSES:
                stop = (f"early stopping will end it {patience} evaluations ({patience * eval_every} steps) after "
                        "validation stops improving" if patience else "early stopping is OFF (patience 0)")
                warnings.append(f"warning: {p.name} sees {s} {x:.1f} times (more than {MAX_PASSES:g} passes): "
                                f"expect it to memorise; {stop}. Lower --tokens/--epochs or add data")
    if tok_per_s:
        lines.append(f"plan speed: ~{tok_per_s:,.0f} tokens/s on {chip} ({basis})")
    return lines + warnings


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
