"""`pocketlm train`: run the pretrain phase, the SFT phase, or both in a row, fresh or resumed.

Owns the run folder (`runs/NAME/config.json`, `metrics.jsonl`, `{pretrain,sft}/{best,last}`) and the
choice of each phase's starting point: a new model, the pretrain best/ (SFT), --init, or last/ (--resume).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pocketlm import PocketLMError
from pocketlm.cache.shards import Cache, check_file, read_meta
from pocketlm.config import from_dict
from pocketlm.device import limit_mps_memory, pick_device
from pocketlm.files import atomic_write, sha256_file
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.io import INFO_FILE, WEIGHTS_FILE, load_model
from pocketlm.tokenizer.tokenizer_sp import MODEL_FILE, Tokenizer
from pocketlm.train import ddp, metrics
from pocketlm.train.budget import describe_budget, estimate_speed, phase_budget, resolve_steps
from pocketlm.train.checkpoint import load_state
from pocketlm.train.config import TrainConfig, config_dict
from pocketlm.train.loop import RunContext, run_phase
from pocketlm.train.precision import device_name, resolve_precision
from pocketlm.train.pretrain import parse_mix, pretrain_phase
from pocketlm.train.sft import sft_phase

PRESETS = {"v1": GPTConfig.v1, "tiny": GPTConfig.tiny}
PIPELINES = {"pretrain": ("pretrain",), "sft": ("sft",), "pretrain_then_sft": ("pretrain", "sft")}
# Beside a phase's best/ and last/: the model folder it started from and the sha256 of its weights, so
# a phase whose start has changed since (pretraining went on) is known to be stale.
STARTED_FROM = "started_from.json"


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
               log) -> list[str]:
    """Steps, tokens, passes over each source and an estimated time per phase, with warnings; returns
    the lines (config.json keeps them for the run page)."""
    chip = device_name(device)
    speed, basis = estimate_speed(mcfg, cfg.seq_len, cfg.micro_batch, device,
                                  resolve_precision(device, cfg.precision),
                                  cfg.compile if cfg.compile is not None else device.type == "cuda")
    budgets = [phase_budget(cfg, name, world) for name in phases]
    lines = describe_budget(budgets, speed and speed * world, chip, cfg.patience, cfg.eval_every, basis)
    for line in lines:
        log(line)
    return lines


def sft_start(cfg: TrainConfig, init: str | None) -> Path:
    """The model folder SFT starts from: --init, else the run's pretrain best/."""
    return Path(init) if init else Path(cfg.runs_dir) / cfg.name / "pretrain" / "best"


def started_from(start: Path | None) -> dict[str, Any]:
    """What a phase starts from: a new model, or a model folder and the sha256 of its weights."""
    if start is None:
        return {"from": "new model"}
    return {"from": str(start), "sha256": sha256_file(start / WEIGHTS_FILE)}


def stale_start(phase_dir: Path, start: Path | None) -> str | None:
    """Why the checkpoints in `phase_dir` no longer descend from `start` (None when they do)."""
    if start is None:
        return None
    path = phase_dir / STARTED_FROM
    if not path.is_file():  # written before this record existed: nothing to compare
        return None
    recorded = json.loads(path.read_text(encoding="utf-8"))
    if not (start / WEIGHTS_FILE).is_file():
        return f"{start} is gone"
    now = sha256_file(start / WEIGHTS_FILE)
    if recorded.get("sha256") != now:
        return (f"it started from {recorded.get('from', start)} (sha256 {str(recorded.get('sha256'))[:12]}…), "
                f"which now holds other weights (sha256 {now[:12]}…)")
    return None


def phase_finished(cfg: TrainConfig, name: str, state: dict[str, Any]) -> bool:
    """A phase is over at its last step, or when it stopped early (patience evaluations without a better
    validation loss): resuming it then would undo the early stop."""
    total = cfg.pretrain_steps if name == "pretrain" else cfg.sft_steps
    return state["step"] >= total or bool(cfg.patience and state.get("stale_evals", 0) >= cfg.patience)


# Fields that must be at least 1, and those that must not be negative.
POSITIVE = ("seq_len", "micro_batch", "accum_steps", "sft_steps", "eval_every", "eval_batches", "log_every")
NON_NEGATIVE = ("tokens", "epochs", "lr", "sft_lr", "min_lr_frac", "warmup_frac", "decay_frac", "muon_lr",
                "muon_momentum", "z_loss", "weight_decay", "beta2", "grad_clip", "patience", "sample_tokens",
                "ddp_bucket_mb", "seed", "warmup_steps", "pretrain_steps")


def check_config(cfg: TrainConfig) -> None:
    """Numbers out of range, named with their flag, before anything is read or written."""
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise PocketLMError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise PocketLMError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if cfg.pretrain_steps == 0:
        raise PocketLMError("--pretrain-steps must be at least 1 (leave it unset to use --tokens or --epochs)")


def finished_run(cfg: TrainConfig, pipeline: str = "pretrain_then_sft", init: str | None = None) -> list[str] | None:
    """One line per phase when every phase of `pipeline` has finished and SFT still descends from its start;
    None when there is training left to do (or to redo)."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    if not all((run_dir / name / "last").exists() for name in PIPELINES[pipeline]):
        return None
    cfg = resolve_steps(cfg)
    lines = []
    for name in PIPELINES[pipeline]:
        state = load_state(run_dir / name / "last")
        start = None if name == "pretrain" else sft_start(cfg, init)
        if not phase_finished(cfg, name, state) or stale_start(run_dir / name, start):
            return None
        total = cfg.pretrain_steps if name == "pretrain" else cfg.sft_steps
        how = "stopped early" if state["step"] < total else "finished"
        lines.append(f"{name} {how} at step {state['step']} of {total}: {run_dir / name / 'best'}")
    return lines


def check_sources(cfg: TrainConfig, phases: tuple[str, ...], tok: Tokenizer) -> None:
    """Every phase's sources are in the cache, of the right kind, before the first step: a missing SFT
    source shows now, not after pretraining."""
    cache = Cache(cfg.cache, tokenizer_hash=tok.hash, verify="size")
    wanted = {"pretrain": ("pretrain", list(parse_mix(cfg.pretrain_mix)) + list(cfg.eval_sources),
                           "--pretrain-mix / --eval-sources"),
              "sft": ("sft", list(parse_mix(cfg.sft_sources, "sft_sources")), "--sft-sources")}
    for name in phases:
        kind, sources, flag = wanted[name]
        have = cache.sources(kind)
        missing = [s for s in sources if s not in have]
        if missing:
            raise PocketLMError(
                f"{cfg.cache}: the {name} phase needs {kind} source(s) {', '.join(missing)}, which this cache "
                f"lacks (its {kind} sources: {', '.join(have) or 'none'}); change {flag} or rebuild the cache "
                f"with `pocketlm cache build ... --{kind} {' '.join(missing)}`")


def check_start(start: Path, tok: Tokenizer) -> None:
    """SFT's starting model exists and reads the cache's tokenizer."""
    if not (start / INFO_FILE).is_file():
        raise PocketLMError(f"SFT starts from {start}, which is not a model folder: run the pretrain phase first "
                            "or pass --init MODEL_DIR")
    info = json.loads((start / INFO_FILE).read_text(encoding="utf-8"))
    if info.get("tokenizer_sha256") != tok.hash:
        raise PocketLMError(f"{start} was trained with another tokenizer than the cache's {tok.path}; pass --init "
                            "a model of this tokenizer or --cache a cache built with the model's")


def train(cfg: TrainConfig, model_overrides: dict[str, Any] | None = None, pipeline: str = "pretrain_then_sft",
          resume: bool = False, init: str | None = None) -> Path:
    """Run the phases of `pipeline`; returns the last phase's best/ folder.

    With `resume`, each phase continues from its last/ checkpoint; a finished phase (last step reached, or
    stopped early) is left as it is. In the pipeline, an SFT phase whose starting pretrain best/ has changed
    since is started over; run alone, it is refused.
    """
    if pipeline not in PIPELINES:
        raise PocketLMError(f"unknown pipeline {pipeline!r}: use {', '.join(PIPELINES)}")
    phases = PIPELINES[pipeline]
    check_config(cfg)
    run_dir = Path(cfg.runs_dir) / cfg.name
    dist = ddp.init_from_env(pick_device(cfg.device).type)
    for name in phases:  # before anything depends on them: a folder that some nodes lack stops every node
        ddp.same_on_every_rank(run_dir / name / "last", dist)
    if resume and not any((run_dir / name / "last").exists() for name in phases):
        raise PocketLMError(f"--resume: nothing to resume in {run_dir} (no {' or '.join(f'{n}/last' for n in phases)}"
                            "); to start this run, give the same command without --resume")
    device = ddp.device_for(pick_device(cfg.device), dist)
    log = tqdm.write if dist.rank == 0 else (lambda _msg: None)
    limit_mps_memory(device, log)
    tok = cache_tokenizer(Path(cfg.cache))
    check_sources(cfg, phases, tok)
    # SFT's start is known now unless this run's pretraining is about to write it.
    if "sft" in phases and (init or "pretrain" not in phases) and not (resume and (run_dir / "sft" / "last").exists()):
        check_start(sft_start(cfg, init), tok)
    cfg = resolve_steps(cfg, dist.world)
    run = RunContext(cfg, run_dir, device, tok, dist, log)
    mcfg = model_config(cfg, model_overrides or {}, tok.vocab_size)
    plan = print_plan(cfg, mcfg, PIPELINES[pipeline], device, dist.world, log)
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"train": config_dict(cfg), "model": mcfg.to_dict(), "pipeline": pipeline, "init": init,
                    "world_size": dist.world, "tokenizer": str(tok.path), "plan": plan}
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    best = run_dir
    for name in phases:
        phase_dir = run_dir / name
        best = phase_dir / "best"
        start = None if name == "pretrain" else sft_start(cfg, init)
        state = None
        if resume and (phase_dir / "last").exists() and (why := stale_start(phase_dir, start)):
            if "pretrain" not in phases:
                raise PocketLMError(f"{phase_dir} is stale: {why}; run the pipeline with --resume (it redoes SFT "
                                    f"from the new start) or pass --init the model it started from")
            log(f"{name}: {why}; {name} starts over from {start}")
            ddp.barrier(dist)
            if dist.rank == 0:
                metrics.truncate_after(run.metrics_path, "pretrain", 1 << 62)  # drop the stale phase's lines
                shutil.rmtree(phase_dir)
            ddp.barrier(dist)
        if resume and (phase_dir / "last").exists():
            state = load_state(phase_dir / "last")
            if phase_finished(cfg, name, state):
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
            ddp.same_on_every_rank(start, dist)
            if not start.exists():
                raise PocketLMError(f"SFT starts from {start}, which does not exist: run the pretrain phase first "
                                    "or pass --init MODEL_DIR")
            model, _, _ = load_model(start, device)
            log(f"sft starts from {start}")
        if state is None and dist.rank == 0:
            phase_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(phase_dir / STARTED_FROM, (json.dumps(started_from(start), indent=2) + "\n").encode())
        model.train()
        phase = pretrain_phase(cfg, tok, log) if name == "pretrain" else sft_phase(cfg, tok, log)
        run_phase(run, phase, model, tok.path, state)
        del model  # the next phase loads its own copy from disk
    ddp.barrier(dist)
    ddp.shutdown(dist)
    return best
