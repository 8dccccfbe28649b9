"""Appending benchmark rows to bench/results.jsonl, each with where and when it was measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def commit() -> str:
    """The measured code's commit: $POCKETLM_COMMIT (copies without .git), else git's, else unknown."""
    if os.environ.get("POCKETLM_COMMIT"):
        return os.environ["POCKETLM_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=RESULTS.parent)
    return out.stdout.strip() or "unknown"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def append(bench: str, device: torch.device, rows: list[dict], path: Path = RESULTS) -> None:
    """One JSON line per row, stamped with the bench, device, torch (and transformers) version, date, commit."""
    try:
        import transformers
        hf = transformers.__version__
    except ImportError:
        hf = None
    stamp = {"bench": bench, "device": device_label(device), "torch": torch.__version__, "transformers": hf,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "commit": commit()}
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, **stamp}) + "\n")
