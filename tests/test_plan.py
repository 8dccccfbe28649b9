"""The memory planner (parameter count, choices under a budget, predictions vs what autograd keeps and vs
measured CPU peaks), `pocketlm plan` as a user runs it, and the time estimate's peak and CPU timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.mps_memory import measure
from pocketlm import PocketLMError
from pocketlm.config import load_toml
from pocketlm.model import GPT, GPTConfig
from pocketlm.train.precision import apple_gpu_cores, gpu_cores, peak_flops
from pocketlm.train.plan import METAL_FREE, METAL_WORKING_SET, estimate, n_params, parse_memory, plan, usable

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
    assert (p.micro_batch, p.accum_steps, p.checkpointing, p.precision) == (8, 8, False, "fp16")
    # 15% of Metal's recommended working set (2/3 of RAM when planning from another machine) stays free.
    assert p.estimate.total <= p.budget == int(0.85 * int(2 / 3 * 16 * GIB))
    # The next size up would not fit: the plan takes the largest micro-batch that does.
    assert estimate(GPTConfig.v1(), 16, 1024, "fp16", "mps", False).total > p.budget


def test_a_known_metal_working_set_replaces_the_guess_and_keeps_15_percent_free():
    limit = int(10.5 * GIB)
    assert usable("mps", 16 * GIB, limit) == int((1 - METAL_FREE) * limit)
    assert usable("mps", 16 * GIB) == int((1 - METAL_FREE) * int(METAL_WORKING_SET * 16 * GIB))
    p = plan(GPTConfig.v1(), 1024, "mps", 16 * GIB, 65536, metal_limit=limit)
    assert p.estimate.total <= 0.85 * limit


# What autograd keeps for backward after one training forward, counted with saved-tensor hooks on the
# path each device takes: "mps" = fp16 autocast with SDPA's math path (MPS has no fused attention with
# grad enabled), "cpu" = fp32 with the flash CPU kernel. Counted under FakeTensorMode (seconds at the v1
# shape; test_fake_tensors_count_what_real_tensors_keep holds that count to the real one).
SHAPES = [(GPTConfig.v1(), 1024, 1), (GPTConfig.v1(), 1024, 2),
          (GPTConfig.tiny(), 128, 2), (GPTConfig.tiny(), 128, 8)]


@pytest.mark.parametrize("path", ["mps", "cpu"])
@pytest.mark.parametrize("cfg,seq_len,micro_batch", SHAPES, ids=["v1-b1", "v1-b2", "tiny-b2", "tiny-b8"])
def test_planned_activations_within_10_percent_of_what_autograd_saves(cfg, seq_len, micro_batch, path):
    measured = measure(cfg, micro_batch, seq_len, path)
    e = estimate(cfg, micro_batch, seq_len, "fp16" if path == "mps" else "fp32", path, False, compiled=False)
    assert 0.9 < e.saved / measured < 1.1, (e.saved, measured)


@pytest.mark.parametrize("path", ["mps", "cpu"])
def test_fake_tensors_count_what_real_tensors_keep(path):
    cfg = GPTConfig.tiny()
    assert measure(cfg, 2, 128, path, fake=True) == measure(cfg, 2, 128, path, fake=False)


def test_the_mps_code_branch_keeps_what_the_emulation_counts():
    # Under the MPS-rules mode attention takes the MPS branch (contiguous q/k/v, the SDPA self-check):
    # the copies it makes are not kept for backward, so the count is the emulation's.
    from pocketlm.mps_rules import MPSRules

    cfg = GPTConfig.tiny()
    plain = measure(cfg, 2, 128, "mps", fake=False)
    with MPSRules():
        assert measure(cfg, 2, 128, "mps", fake=False) == plain


def test_mps_peak_with_the_backward_within_10_percent_of_the_emulated_step():
    """Peak RSS growth of one whole fp16 training step with math attention on the CPU (MPS's path, the
    backward's T x T temporaries included), in a fresh process, against the planner's MPS `live`."""
    out = subprocess.run(
        [sys.executable, "bench/train_step.py", "--device", "cpu", "--modes", "fp16+math", "--n-layer", "2",
         "--n-embd", "128", "--n-head", "4", "--vocab-size", "4000", "--seq-len", "256", "--micro-batch", "2",
         "--steps", "1", "--json", "--no-record"],
        cwd=REPO, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(out.stdout)
    cfg = GPTConfig.v1(n_layer=2, n_embd=128, n_head=4, vocab_size=4000)
    e = estimate(cfg, 2, 256, "fp16", "mps", False)
    assert r["predicted_bytes"] == e.live and e.backward > 0
    assert 0.9 < r["ratio"] < 1.1, r


def test_mps_peak_adds_the_attention_backward_temporaries():
    # The math path's backward holds the probabilities' and the scores' gradients (fp32, B*H*T*T each) for
    # one layer at a time; past the loss's chunk of logits they set the peak.
    cfg = GPTConfig.v1()
    e = estimate(cfg, 16, 1024, "fp16", "mps", False)
    assert e.backward == 2 * 16 * 8 * 1024 * 1024 * 4
    assert e.live == e.static + e.activations + e.mask + e.loss_saved + e.backward
    assert estimate(cfg, 16, 1024, "fp32", "cpu", False).backward == 0


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
    assert (planned["micro_batch"], planned["accum_steps"]) == (8, 4)


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


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketlm", "plan", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def _value(stdout: str, key: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith(key))


def test_plan_of_a_config_keeps_its_tokens_per_step():
    r = _plan("--config", "configs/m4_16gb.toml")
    assert r.returncode == 0, r.stderr
    train = load_toml(REPO / "configs" / "m4_16gb.toml")["train"]
    assert int(_value(r.stdout, "micro_batch")) == train["micro_batch"]
    assert int(_value(r.stdout, "accum_steps")) == train["accum_steps"]
    assert f"({train['micro_batch'] * train['accum_steps'] * train['seq_len']:,} tokens per step)" in r.stdout


@pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="the default is this Mac's device")
def test_plan_without_flags_says_it_plans_for_mps():
    r = _plan()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("planning for mps (an Apple GPU, the default)")
    assert "planning for" not in _plan("--device", "cpu").stdout  # a device named: nothing to point out


def test_out_of_memory_hint_names_a_flag_plan_takes():
    r = _plan("--memory", "1.4GB")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lower --seq-len" in lines[0], lines
    shorter = _plan("--memory", "1.4GB", "--seq-len", "128")  # the hint works
    assert shorter.returncode == 0, shorter.stderr
    assert "checkpointing on" in shorter.stdout


# `system_profiler SPDisplaysDataType` on a base M4 Mac mini (abridged), and `ioreg -rc AGXAccelerator -d 1`.
PROFILER = """Graphics/Displays:

    Apple M4:

      Chipset Model: Apple M4
      Type: GPU
      Bus: Built-In
      Total Number of Cores: 10
      Vendor: Apple (0x106b)
      Metal Support: Metal 3
"""
IOREG = """+-o AGXAcceleratorG16G  <class AGXAcceleratorG16G, id 0x1000003a1, registered, matched, active>
    {
      "gpu-core-count" = 8
      "IOClass" = "AGXAcceleratorG16G"
    }
"""


def test_gpu_core_count_read_from_the_system_reports():
    assert gpu_cores(PROFILER) == 10
    assert gpu_cores(IOREG) == 8
    assert gpu_cores("") is None and gpu_cores("Total Number of Cores: lots") is None


def test_m4_peak_from_its_core_count_else_the_lower_published_figure(monkeypatch):
    monkeypatch.setattr("pocketlm.train.precision.apple_gpu_cores", lambda: 10)
    assert peak_flops("Apple M4", "fp16") == pytest.approx(3.8e12)
    monkeypatch.setattr("pocketlm.train.precision.apple_gpu_cores", lambda: None)
    assert peak_flops("Apple M4", "fp16") == pytest.approx(3.0e12)
    assert peak_flops("Apple M4 Pro", "fp16") == pytest.approx(9.2e12)  # the table, core count not asked
    assert apple_gpu_cores() is None or sys.platform == "darwin"  # never fails off a Mac


def test_cpu_run_prints_a_timed_time_estimate(small_cache, data_dir):
    from pocketlm.train.budget import resolve_steps
    from pocketlm.train.config import TrainConfig
    from pocketlm.train.run import print_plan

    cache = small_cache([("fineweb_edu:take=40", "pretrain")], data_dir)
    cfg = resolve_steps(TrainConfig(cache=str(cache), seq_len=64, micro_batch=4, accum_steps=1, pretrain_steps=100,
                                    pretrain_mix=("fineweb_edu=1",), device="cpu"))
    lines: list[str] = []
    print_plan(cfg, GPTConfig.tiny(vocab_size=2000), ("pretrain",), torch.device("cpu"), 1, lines.append)
    assert "unknown on this device" not in lines[0] and "(estimate)" in lines[0], lines
    speed = next(line for line in lines if line.startswith("plan speed"))
    assert "timed here: median of 3 forward+backward passes of 4 x 64 tokens" in speed, speed


def test_plan_refuses_a_seq_len_the_model_cannot_take():
    r = _plan("--device", "mps", "--seq-len", "4096")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("pocketlm: error: --seq-len 4096: use 1 to the model's block_size 1024 "
                                "(or raise --model-block-size)")
