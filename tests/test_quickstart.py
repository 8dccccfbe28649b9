"""`pocketlm quickstart` end to end, offline, with fewer steps than the real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pocketlm.model.io import load_model

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs_the_whole_pipeline_offline(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pocketlm", "quickstart", "--out", str(out), "--steps", "12",
                           "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = out / "run" / "sft" / "best"
    assert f"pocketlm chat --ckpt {best}" in proc.stdout
    assert f"pocketlm serve --ckpt {best}" in proc.stdout
    assert "assistant:" in proc.stdout
    model, tok, meta = load_model(best)
    assert tok.vocab_size == model.cfg.vocab_size == 4096
    assert (meta["phase"], meta["step"]) == ("sft", 12)
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {(r["phase"], r["source"]) for r in lines if r["kind"] == "eval"}
    assert evals == {("pretrain", "embedded"), ("pretrain", "all"), ("sft", "primer"), ("sft", "all")}
    assert (out / "run" / "loss.png").stat().st_size > 10_000 and (out / "run" / "bpb.png").is_file()
    # A second run finds every stage done and only re-evaluates and prints.
    again = subprocess.run([sys.executable, "-m", "pocketlm", "quickstart", "--out", str(out), "--steps", "12",
                            "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "run" / "metrics.jsonl").read_text().count("\n") == len(lines)
