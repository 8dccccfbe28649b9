"""`pocketlm quickstart` end to end, offline, with fewer steps than the real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pocketlm.files import sha256_file
from pocketlm.model.io import load_model



def checkpoint_bytes(run: Path) -> dict[str, bytes]:
    """Every file of both phases' checkpoints (through the best/last links, which name the folders)."""
    files = {}
    for phase in ("pretrain", "sft"):
        for kind in ("best", "last"):
            link = run / phase / kind
            files[f"{phase}/{kind} -> {os.readlink(link)}"] = b""
            for f in sorted(link.resolve().iterdir()):
                files[f"{phase}/{kind}/{f.name}"] = f.read_bytes()
    return files


def quickstart(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pocketlm", "quickstart", *map(str, args), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=600)


def test_quickstart_runs_the_whole_pipeline_offline(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pocketlm", "quickstart", "--out", str(out), "--steps", "12",
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
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
    # A second run finds every stage done, says so and does nothing.
    before = checkpoint_bytes(out / "run")
    again = quickstart("--out", out, "--steps", "12")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.splitlines()[0] == f"quickstart already finished in {out}: nothing to do (--fresh starts over)"
    assert (out / "run" / "metrics.jsonl").read_text().count("\n") == len(lines)
    assert checkpoint_bytes(out / "run") == before
    # More pretraining changes pretrain/best: SFT is redone from it, not continued from the old one.
    longer = quickstart("--out", out, "--steps", "24")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "sft starts over from" in longer.stdout
    started = json.loads((out / "run" / "sft" / "started_from.json").read_text())
    assert started["sha256"] == sha256_file(out / "run" / "pretrain" / "best" / "model.safetensors")
    assert load_model(out / "run" / "pretrain" / "best")[2]["step"] > 12
    sft = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft if r["phase"] == "sft" and r["kind"] == "eval" and r["source"] == "all"] == [24]


# A run that cannot improve: weights that never move, so the second evaluation is no better and each phase
# stops early at step 4 of 12 (patience 1).
STOPS_EARLY = """
[recipe]
pretrain = ["embedded:take=150"]
sft = ["primer"]
eval = []
vocab_size = 1000
[train]
name = "run"
model = "tiny"
seq_len = 64
micro_batch = 4
accum_steps = 1
pretrain_steps = 12
sft_steps = 12
optimizer = "adamw"
lr = 0.0
sft_lr = 0.0
warmup_steps = 1
eval_every = 2
patience = 1
eval_batches = 1
log_every = 2
sample_tokens = 0
[model]
block_size = 64
"""


def test_a_second_quickstart_leaves_a_run_that_stopped_early_byte_identical(tmp_path):
    config = tmp_path / "stops_early.toml"
    config.write_text(STOPS_EARLY)
    out = tmp_path / "qs"
    first = quickstart("--out", out, "--config", config)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "pretrain: stopped early at step 4 of 12" in first.stdout
    before = checkpoint_bytes(out / "run")
    metrics = (out / "run" / "metrics.jsonl").read_bytes()
    again = quickstart("--out", out, "--config", config)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert checkpoint_bytes(out / "run") == before
    assert (out / "run" / "metrics.jsonl").read_bytes() == metrics
    assert again.stdout.splitlines()[:3] == [
        f"quickstart already finished in {out}: nothing to do (--fresh starts over)",
        f"  pretrain stopped early at step 4 of 12: {out / 'run' / 'pretrain' / 'best'}",
        f"  sft stopped early at step 4 of 12: {out / 'run' / 'sft' / 'best'}"]
    # --fresh starts over: the same run again, trained from scratch.
    fresh = quickstart("--out", out, "--config", config, "--fresh")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "pretrain: stopped early at step 4 of 12" in fresh.stdout
    assert load_model(out / "run" / "sft" / "best")[2]["step"] == 2
