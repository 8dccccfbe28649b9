"""Checkpoints: `runs/NAME/{pretrain,sft}/{best,last}/` = a model folder + `state.pt`, and snapshots.

Each save writes a fresh hidden folder, then atomically repoints the `best`/`last` symlink at it and
deletes the old one, so a kill at any moment leaves the previous checkpoint whole. `state.pt` holds
everything else needed to continue exactly: optimizer, precision (scaler), step, RNG, sampler position.

Snapshots (`{phase}/snapshots/step-NNNNNN/`) are plain model folders in fp16, weights only: a history
of the model to watch and compare, never resumed from, so they hold no state and cost half the bytes.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pocketlm import PocketLMError
from pocketlm.model import GPT
from pocketlm.model.io import save_model

STATE_FILE = "state.pt"
SNAPSHOTS = "snapshots"  # {phase}/snapshots/step-NNNNNN/


def weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_checkpoint(phase_dir: Path, kind: str, model: nn.Module, tokenizer_path: Path,
                    meta: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write `phase_dir/kind` (kind = best | last) atomically; returns its path."""
    if not weights_finite(model):
        raise PocketLMError(f"refusing to save {phase_dir / kind} at step {state.get('step')}: non-finite weights")
    phase_dir.mkdir(parents=True, exist_ok=True)
    target = phase_dir / f".{kind}-{state.get('step', 0):06d}-{uuid.uuid4().hex[:8]}"
    tmp = target.with_name(target.name + ".tmp")
    save_model(tmp, model, tokenizer_path, meta)
    torch.save(state, tmp / STATE_FILE)
    os.replace(tmp, target)
    link = phase_dir / kind
    old = link.resolve() if link.is_symlink() else None
    tmp_link = phase_dir / f".{kind}.link.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(target.name)
    os.replace(tmp_link, link)  # the atomic moment: readers see the old or the new folder, never half
    if old is not None and old.exists():
        shutil.rmtree(old)
    _remove_orphans(phase_dir, kind, keep=target)
    return link


def _remove_orphans(phase_dir: Path, kind: str, keep: Path) -> None:
    """Folders left behind by a save that was killed before its symlink swap."""
    for p in phase_dir.glob(f".{kind}-*"):
        if p.is_dir() and p.name != keep.name:
            shutil.rmtree(p)


def load_state(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise PocketLMError(f"{path} not found: {ckpt_dir} is not a training checkpoint (need best/ or last/)")
    # map_location=cpu and a local: the loaded tensors go out of scope after they are copied in.
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot_interval(every: int, keep: int, steps: int, eval_every: int) -> int:
    """Evaluations between snapshots in a phase of `steps` steps: `every`, widened so that the phase's
    evaluations yield at most `keep` snapshots; 0 = none. Fixed by the plan, not by what is on disk, so
    a resumed phase snapshots at the same steps as an uninterrupted one."""
    if every <= 0 or keep <= 0:
        return 0
    evals = math.ceil(steps / eval_every)
    return max(every, math.ceil(evals / keep))


def save_snapshot(phase_dir: Path, model: nn.Module, tokenizer_path: Path, meta: dict[str, Any]) -> Path:
    """Write the model's weights in fp16 as the model folder `phase_dir/snapshots/step-NNNNNN`
    (replacing one a killed run left at that step); returns its path."""
    # A shell on the meta device takes fp16 CPU copies of the weights: the save never holds a second
    # fp32 copy of the model (the rotary tables are not saved, so the shell needs none).
    with torch.device("meta"):
        shell = GPT(model.cfg)
    shell.load_state_dict({k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()},
                          assign=True)
    return save_model(phase_dir / SNAPSHOTS / f"step-{meta['step']:06d}", shell, tokenizer_path, meta)
