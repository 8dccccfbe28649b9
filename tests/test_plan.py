"""The memory planner: parameter count, choices under a budget, and predictions vs measured CPU peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pocketlm import PocketLMError
from pocketlm.config import load_toml
from pocketlm.model import GPT, GPTConfig
from pocketlm.train.plan import estimate, n_params, parse_memory, plan

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def test_parameter_count_matches_the_model():
    assert n_params(GPTConfig.v1()) == 33_890_816
    small = GPTConfig.tiny(vocab_size=300)
    assert n_params(small) == GPT(small).num_params()


def test_parse_memory():
    assert parse_memory("16GB") == 16 * GIB
    assert parse_memory("512MiB") == 512 << 20
    assert parse_memory("80") == 80 * GIB
    with pytest.raises(PocketLMError, match="--memory"):
        parse_memory("lots")


def test_m4_16gb_plan_fits_v1_without_checkpointing():
    p = plan(GPTConfig.v1(), 1024, "mps", 16 * GIB, 65536)
    assert (p.micro_batch, p.accum_steps, p.checkpointing, p.precision) == (16, 4, False, "fp16")
    assert p.estimate.total <= p.budget == int(0.6 * 16 * GIB)
    # The next size up would not fit: the plan takes the largest micro-batch that does.
    assert estimate(GPTConfig.v1(), 32, 1024, "fp16", "mps", False).total > p.budget


def test_the_eager_loss_keeps_one_chunk_of_logits_and_compiled_cuda_the_whole_batch():
    # MPS and CPU run the chunked loss: past CHUNK_TOKENS rows only the saved gradients grow.
    mps = [estimate(GPTConfig.v1(), b, 1024, "fp16", "mps", False).logits for b in (8, 16, 32)]
    per_row = 1024 * 512 * 4  # the hidden states' gradient, fp32
    assert (mps[1] - mps[0], mps[2] - mps[1]) == (8 * per_row, 16 * per_row)
    cuda = [estimate(GPTConfig.v1(), b, 1024, "bf16", "cuda", False, compiled=True).logits for b in (8, 16)]
    assert cuda[1] == 2 * cuda[0] == 2 * 8 * 1024 * 16000 * 18


def test_small_budget_turns_checkpointing_on_and_raises_when_nothing_fits():
    p = plan(GPTConfig.v1(), 1024, "mps", 3 * GIB, 65536)
    assert p.checkpointing and p.micro_batch * p.accum_steps * 1024 >= 65536
    no_ckpt = estimate(GPTConfig.v1(), p.micro_batch, 1024, "fp16", "mps", False)
    assert p.estimate.activations < no_ckpt.activations / 4
    with pytest.raises(PocketLMError, match="micro_batch 1"):
        plan(GPTConfig.v1(), 1024, "mps", GIB // 2, 65536)


def test_shipped_m4_config_takes_the_planner_output(tmp_path):
    # The Mac recipe keeps the GPU recipe's 32,768 tokens a step; every value the planner writes for it
    # is the shipped file's, which adds the recipe's other settings.
    out = tmp_path / "m4.toml"
    subprocess.run([sys.executable, "-m", "pocketlm", "plan", "--device", "mps", "--memory", "16GB",
                    "--batch-tokens", "32768", "--write", str(out)], cwd=REPO, check=True, capture_output=True)
    planned = load_toml(out)["train"]
    shipped = load_toml(REPO / "configs" / "m4_16gb.toml")["train"]
    assert planned == {k: shipped[k] for k in planned}
    assert (planned["micro_batch"], planned["accum_steps"]) == (16, 2)


@pytest.mark.parametrize("micro_batch", [2, 8])
def test_prediction_within_15_percent_of_measured_cpu_peak(micro_batch):
    """Live bytes at the peak of one fp32 training step in a fresh process (CPU: materialised attention):
    peak RSS growth with glibc's mmap threshold fixed by the bench, against the planner's `live`."""
    out = subprocess.run(
        [sys.executable, "bench/train_step.py", "--device", "cpu", "--modes", "fp32", "--n-layer", "2",
         "--n-embd", "128", "--n-head", "4", "--vocab-size", "4000", "--seq-len", "256",
         "--micro-batch", str(micro_batch), "--steps", "1", "--json", "--no-record"],
        cwd=REPO, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(out.stdout)
    cfg = GPTConfig.v1(n_layer=2, n_embd=128, n_head=4, vocab_size=4000)
    assert r["predicted_bytes"] == estimate(cfg, micro_batch, 256, "fp32", "cpu", False).live
    assert 0.85 < r["ratio"] < 1.15, r
