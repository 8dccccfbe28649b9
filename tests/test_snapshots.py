"""Snapshots kept while training (fp16 model folders, spaced to fit a budget), the plan stored in the
run folder, and the TensorBoard option read back against metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pocketlm.model.io import load_model
from pocketlm.train import metrics
from pocketlm.train.checkpoint import snapshot_interval
from pocketlm.train.config import TrainConfig
from pocketlm.train.run import train


@pytest.fixture(scope="module")
def cache(small_cache, data_dir) -> Path:
    return small_cache([("fineweb_edu:take=200", "pretrain"), ("wikitext", "eval")], data_dir)


def tiny(cache: Path, runs: Path, **over) -> TrainConfig:
    values = dict(name="snap", runs_dir=str(runs), cache=str(cache), model="tiny", pretrain_mix=("fineweb_edu=1",),
                  seq_len=64, micro_batch=4, accum_steps=1, pretrain_steps=40, lr=3e-3, warmup_steps=5,
                  eval_every=10, eval_batches=2, log_every=5, sample_tokens=4, device="cpu")
    values.update(over)
    return TrainConfig(**values)


def test_snapshot_interval_fits_the_budget():
    # v1 defaults: a 20,000-step pretrain evaluated every 250 steps has 80 evaluations; 14 snapshots at most.
    cfg = TrainConfig()
    every = snapshot_interval(cfg.snapshot_every, cfg.snapshot_max, 20_000, cfg.eval_every)
    assert every == 6 and 80 // every <= cfg.snapshot_max
    assert snapshot_interval(1, 14, 1000, 250) == 1  # a short SFT phase: every evaluation
    assert snapshot_interval(3, 14, 1000, 250) == 3
    assert snapshot_interval(0, 14, 1000, 250) == 0 and snapshot_interval(1, 0, 1000, 250) == 0
    for steps in range(1, 5000, 37):  # never more than the budget, whatever the phase's length
        every = snapshot_interval(1, 5, steps, 10)
        assert sum(e % every == 0 for e in range(1, -(-steps // 10) + 1)) <= 5


def test_training_keeps_fp16_snapshots_and_its_plan(cache, tmp_path):
    # 4 evaluations, at most 2 snapshots: one every 2 evaluations (steps 20 and 40).
    train(tiny(cache, tmp_path, snapshot_every=1, snapshot_max=2), pipeline="pretrain")
    run = tmp_path / "snap"
    records = metrics.read(run / "metrics.jsonl")
    snaps = [r for r in records if r["kind"] == "snapshot"]
    assert [(r["phase"], r["step"], r["path"]) for r in snaps] == [
        ("pretrain", 20, "pretrain/snapshots/step-000020"), ("pretrain", 40, "pretrain/snapshots/step-000040")]
    assert sorted(p.name for p in (run / "pretrain" / "snapshots").iterdir()) == ["step-000020", "step-000040"]
    judged = {r["step"]: r["loss"] for r in records if r["kind"] == "eval" and r["source"] == "all"}
    assert [r["val_loss"] for r in snaps] == [judged[20], judged[40]]

    snap = run / "pretrain" / "snapshots" / "step-000040"
    with safe_open(str(snap / "model.safetensors"), "pt") as f:  # fp16 on disk, weights only
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert not (snap / "state.pt").exists()
    # The last snapshot is the final model (last/, fp32) rounded to fp16.
    final, _, _ = load_model(run / "pretrain" / "last")
    model, tok, meta = load_model(snap)
    assert meta["step"] == 40 and meta["phase"] == "pretrain" and tok.vocab_size == final.cfg.vocab_size
    for (name, a), b in zip(final.state_dict().items(), model.state_dict().values()):
        assert torch.equal(b, a.half().float()), name
    size = sum(p.stat().st_size for p in (snap / "model.safetensors",))
    assert size < 0.6 * (run / "pretrain" / "last" / "model.safetensors").stat().st_size

    train_lines = [r for r in records if r["kind"] == "train"]
    assert all(r["steps"] == 40 and r["mem_gib"] > 0 and r["time"] > 0 for r in train_lines)
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert plan[0].startswith("plan pretrain: 40 steps (5 warmup) x 256 tokens")
    assert any("estimate" in line for line in plan)  # the time estimate and its basis are kept too


def test_tensorboard_event_files_hold_the_metrics(cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny(cache, tmp_path, pretrain_steps=20, tensorboard=True, snapshot_every=0), pipeline="pretrain")
    run = tmp_path / "snap"
    assert not (run / "pretrain" / "snapshots").exists()  # snapshot_every=0: none
    events = EventAccumulator(str(run / "tensorboard" / "pretrain"))
    events.Reload()
    want: dict[str, list[tuple[int, float]]] = {}
    for r in metrics.read(run / "metrics.jsonl"):
        for tag, value in metrics.scalars(r).items():
            want.setdefault(tag, []).append((r["step"], value))
    assert {"train/loss", "train/lr", "train/tok_per_s", "val/fineweb_edu/loss", "val/fineweb_edu/bpb",
            "val/wikitext/bpb", "val/all/loss"} <= set(want)
    assert set(events.Tags()["scalars"]) == set(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        # Event files store float32: the values are metrics.jsonl's, rounded to float32.
        assert got == [(s, float(np.float32(v))) for s, v in points], tag


def test_resumed_tensorboard_drops_what_the_killed_run_wrote_past_its_checkpoint(cache, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(cache, tmp_path, pretrain_steps=40, eval_every=20, tensorboard=True, snapshot_every=0, sample_tokens=0)
    append = metrics.append

    def die_at_step_30(path, record):  # the checkpoint of step 20 is on disk; lines 25 and 30 are past it
        append(path, record)
        if record["kind"] == "train" and record["step"] == 30:
            raise KeyboardInterrupt

    monkeypatch.setattr(metrics, "append", die_at_step_30)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, pipeline="pretrain")
    monkeypatch.setattr(metrics, "append", append)
    train(cfg, pipeline="pretrain", resume=True)

    run = tmp_path / "snap"
    events = EventAccumulator(str(run / "tensorboard" / "pretrain"))
    events.Reload()
    lines = [r for r in metrics.read(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25, 30, 35, 40]
    # One value per step, the resumed run's: the killed run's steps 25 and 30 are gone.
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], float(np.float32(r["loss"]))) for r in lines]
