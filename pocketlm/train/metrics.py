"""runs/NAME/metrics.jsonl: one JSON object per line, appended as training goes.

Train lines: {"kind": "train", step, phase, loss, lr, grad_norm, tok_per_s, dt_ms, mfu, precision, skipped}:
loss is the mean over the steps since the previous line, grad_norm that of the last step, mfu null
when the device's peak FLOPS are unknown, skipped the fp16 steps the loss scaler dropped.
Eval lines: {"kind": "eval", step, phase, source, loss, bpb, tokens} and one {"kind": "eval", source: "all"}
line with the phase's validation loss (what best/ is judged by). Sample lines: {"kind": "sample", ...}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
