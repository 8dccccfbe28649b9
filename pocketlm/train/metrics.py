"""runs/NAME/metrics.jsonl: one JSON object per line, appended as training goes (and, optionally, the
same scalars as TensorBoard event files).

Train lines: {"kind": "train", step, phase, loss, lr, grad_norm, tok_per_s, dt_ms, mfu, precision, skipped,
steps, mem_gib, time}: loss is the mean over the steps since the previous line, grad_norm that of the last
step, mfu null when the device's peak FLOPS are unknown, skipped the fp16 steps the loss scaler dropped,
steps the phase's planned length, mem_gib what `loop.memory_gib` reads, time the wall clock (Unix seconds).
Eval lines: {"kind": "eval", step, phase, source, loss, bpb, tokens} and one {"kind": "eval", source: "all"}
line with the phase's validation loss (what best/ is judged by). Sample lines: {"kind": "sample", step,
phase, prompt, text}. Snapshot lines: {"kind": "snapshot", step, phase, val_loss, path} (path relative to
the run folder). Stop lines: {"kind": "stop", step, phase, best_val, stale_evals} (early stopping).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pocketlm import PocketLMError
from pocketlm.files import atomic_write

PHASE_ORDER = {"pretrain": 0, "sft": 1}


def append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_after(path: Path, phase: str, step: int) -> None:
    """Drop lines written after the checkpoint a run resumes from (a killed run logged past it)."""
    cutoff = (PHASE_ORDER[phase], step)
    kept = [r for r in read(path) if (PHASE_ORDER[r["phase"]], r["step"]) <= cutoff]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))


# Train-line fields written as TensorBoard scalars (the rest are labels or counters).
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tok_per_s", "dt_ms", "mfu", "mem_gib")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics line's numbers as TensorBoard tags: `train/loss`, `val/SOURCE/loss`, `val/SOURCE/bpb`."""
    if record["kind"] == "train":
        return {f"train/{k}": record[k] for k in TRAIN_SCALARS if record.get(k) is not None}
    if record["kind"] == "eval":
        return {f"val/{record['source']}/{k}": record[k] for k in ("loss", "bpb") if k in record}
    return {}


class TensorBoard:
    """The same scalars as metrics.jsonl, in `runs/NAME/tensorboard/PHASE/` (one TensorBoard run per
    phase, so both phases' steps start at 1). `purge_step`: on resume, events from this step on that a
    killed run wrote are hidden, as metrics.jsonl drops its lines past the checkpoint."""

    def __init__(self, run_dir: Path, phase: str, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PocketLMError("TrainConfig.tensorboard needs the tensorboard package: pip install "
                                "'pocketlm[tensorboard]' (or tensorboard), or drop --tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard" / phase), purge_step=purge_step)

    def add(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()
