"""`pocketlm train`: run the pretrain phase, the SFT phase, or both in a row, fresh or resumed.

Owns the run folder (`runs/NAME/config.json`, `metrics.jsonl`, `{pretrain,sft}/{best,last}`) and the
choice of each phase's starting point: a new model, the pretrain best/ (SFT), --init, or last/ (--resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pocketlm import PocketLMError
from pocketlm.cache.shards import check_file, read_meta
from pocketlm.config import from_dict
from pocketlm.device import limit_mps_memory, pick_device
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.io import load_model
from pocketlm.tokenizer.tokenizer_sp import MODEL_FILE, Tokenizer
from pocketlm.train import ddp, metrics
from pocketlm.train.budget import describe_budget, estimate_speed, phase_budget, resolve_steps
from pocketlm.train.checkpoint import load_state
from pocketlm.train.config import TrainConfig, config_dict
from pocketlm.train.loop import RunContext, run_phase
from pocketlm.train.precision import device_name, resolve_precision
from pocketlm.train.pretrain import pretrain_phase
from pocketlm.train.sft import sft_phase

PRESETS = {"v1": GPTConfig.v1, "tiny": GPTConfig.tiny}
PIPELINES = {"pretrain": ("pretrain",), "sft": ("sft",), "pretrain_then_sft": ("pretrain", "sft")}


def model_config(cfg: TrainConfig, overrides: dict[str, Any], vocab_size: int) -> GPTConfig:
    if cfg.model not in PRESETS:
        raise PocketLMError(f"TrainConfig.model={cfg.model!r}: use one of {', '.join(PRESETS)}")
    vocab = overrides.get("vocab_size", vocab_size)  # larger than the tokenizer's = padded rows, never read
    if vocab < vocab_size:
        raise PocketLMError(f"[model] vocab_size={vocab} is smaller than the tokenizer's {vocab_size} ids; "
                            "drop it (it defaults to the tokenizer's size)")
    base = PRESETS[cfg.model](vocab_size=vocab).to_dict()
    mcfg = from_dict(GPTConfig, {**base, **overrides, "vocab_size": vocab}, where="[model]")
    if cfg.seq_len > mcfg.block_size:
        raise PocketLMError(f"TrainConfig.seq_len={cfg.seq_len} exceeds the model's block_size={mcfg.block_size}; "
                            "lower --seq-len or raise [model] block_size")
    return mcfg


def cache_tokenizer(cache_dir: Path) -> Tokenizer:
    """The tokenizer the cache was built with: the copy inside the cache, checked against meta.json."""
    path = cache_dir / MODEL_FILE
    check_file(path, read_meta(cache_dir)["tokenizer"]["file"], verify="sha256")
    return Tokenizer.load(path)


def print_plan(cfg: TrainConfig, mcfg: GPTConfig, phases: tuple[str, ...], device: torch.device, world: int,
               log) -> None:
    """Steps, tokens, passes over each source and an estimated time per phase, with warnings."""
    chip = device_name(device)
    speed, basis = estimate_speed(mcfg, cfg.seq_len, cfg.micro_batch, device,
                                  resolve_precision(device, cfg.precision),
                                  cfg.compile if cfg.compile is not None else device.type == "cuda")
    budgets = [phase_budget(cfg, name, world) for name in phases]
    for line in describe_budget(budgets, speed and speed * world, chip, cfg.patience, cfg.eval_every, basis):
        log(line)


def train(cfg: TrainConfig, model_overrides: dict[str, Any] | None = None, pipeline: str = "pretrain_then_sft",
          resume: bool = False, init: str | None = None) -> Path:
    """Run the phases of `pipeline`; returns the last phase's best/ folder."""
    if pipeline not in PIPELINES:
        raise PocketLMError(f"unknown pipeline {pipeline!r}: use {', '.join(PIPELINES)}")
    dist = ddp.init_from_env(pick_device(cfg.device).type)
    device = ddp.device_for(pick_device(cfg.device), dist)
    run_dir = Path(cfg.runs_dir) / cfg.name
    log = tqdm.write if dist.rank == 0 else (lambda _msg: None)
    limit_mps_memory(device, log)
    tok = cache_tokenizer(Path(cfg.cache))
    cfg = resolve_steps(cfg, dist.world)
    run = RunContext(cfg, run_dir, device, tok, dist, log)
    mcfg = model_config(cfg, model_overrides or {}, tok.vocab_size)
    print_plan(cfg, mcfg, PIPELINES[pipeline], device, dist.world, log)
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"train": config_dict(cfg), "model": mcfg.to_dict(), "pipeline": pipeline, "init": init,
                    "world_size": dist.world, "tokenizer": str(tok.path)}
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    best = run_dir
    for name in PIPELINES[pipeline]:
        phase_dir = run_dir / name
        best = phase_dir / "best"
        total = cfg.pretrain_steps if name == "pretrain" else cfg.sft_steps
        state = None
        ddp.same_on_every_rank(phase_dir / "last", dist)
        if resume and (phase_dir / "last").exists():
            state = load_state(phase_dir / "last")
            if state["step"] >= total:
                log(f"{name} already finished ({state['step']} steps) in {phase_dir}")
                continue
            if dist.rank == 0:
                metrics.truncate_after(run.metrics_path, name, state["step"])
            model, _, _ = load_model(phase_dir / "last", device)
            log(f"resuming {name} from {phase_dir / 'last'} at step {state['step']}")
        elif (phase_dir / "last").exists():
            raise PocketLMError(f"{phase_dir} already holds a checkpoint: pass --resume to continue it, or pick "
                                "another --name")
        elif name == "pretrain":
            torch.manual_seed(cfg.seed)
            model = GPT(mcfg).to(device)
        else:
            start = Path(init) if init else run_dir / "pretrain" / "best"
            ddp.same_on_every_rank(start, dist)
            if not start.exists():
                raise PocketLMError(f"SFT starts from {start}, which does not exist: run the pretrain phase first "
                                    "or pass --init MODEL_DIR")
            model, _, _ = load_model(start, device)
            log(f"sft starts from {start}")
        model.train()
        phase = pretrain_phase(cfg, tok, log) if name == "pretrain" else sft_phase(cfg, tok, log)
        run_phase(run, phase, model, tok.path, state)
        del model  # the next phase loads its own copy from disk
    ddp.barrier(dist)
    ddp.shutdown(dist)
    return best
