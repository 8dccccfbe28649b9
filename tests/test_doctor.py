"""`pocketlm doctor` on the CPU, as a user runs it: one JSON report whose numbers are real, positive and
agree with each other and with the model they describe."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "pocketlm", "doctor", "--device", "cpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_doctor_reports_a_tiny_run_on_the_cpu():
    r = run_doctor("--model-preset", "tiny", "--micro-batch", "2", "--seq-len", "32", "--steps", "2",
                   "--decode-tokens", "12", "--prompt-tokens", "20")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # stdout is the JSON alone
    system, model, train, decode = report["system"], report["model"], report["train"], report["decode"]
    assert system["torch"] == torch.__version__ and system["device"] == "cpu"
    assert system["mps_available"] == torch.backends.mps.is_available()
    assert report["config"].endswith("configs/m4_16gb.toml")  # the M4 config's training settings, shrunk by flags
    assert (model["preset"], model["n_layer"], model["head_dim"]) == ("tiny", 2, 16)

    checks = {(c["head_dim"], c["n_head"], c["dtype"]): c for c in report["sdpa_self_check"]}
    assert set(checks) == {(64, 8, "float32"), (16, 4, "float32")}  # v1's shape, then the model's
    assert all(c["ok"] and c["cases"] == 12 and 0 <= c["max_error"] <= c["tol"] for c in checks.values())

    assert (train["steps"], train["micro_batch"], train["seq_len"], train["precision"]) == (2, 2, 32, "fp32")
    assert train["tokens"] == 2 * 2 * 32
    assert train["seconds"] > 0 and math.isclose(train["tokens_per_s"], train["tokens"] / train["seconds"])
    # a randomly initialised model on random tokens: a loss near ln(vocab)
    assert abs(train["last_loss"] - math.log(model["vocab_size"])) < 0.15 * math.log(model["vocab_size"])
    assert train["peak"]["bytes"] > 0 and train["peak"]["process_peak_rss_bytes"] > train["peak"]["bytes"]
    assert train["planned"]["bytes"] > 0
    assert math.isclose(train["peak_over_planned"], train["peak"]["bytes"] / train["planned"]["bytes"])

    for name in ("plain", "inspector"):
        assert decode[name]["tokens"] == 12 and decode[name]["path"] == "eager"
        assert decode[name]["decode_tok_s"] > 0 and decode[name]["prefill_ms"] > 0
    per = decode["per_token"]
    assert per["counted"].startswith("under the MPS-rules mode")
    new_kv = 2 * model["n_layer"] * model["n_head"] * model["head_dim"] * 4  # one token's K and V, fp32
    for name in ("plain", "inspector"):
        assert per[name]["copies_per_token"] == 2 * model["n_layer"] and per[name]["copy_bytes_per_token"] == new_kv
        assert per[name]["host_reads_per_token"] == 1 and per[name]["kv_len_from"] == 21
    assert per["inspector"]["ops_per_token"] > per["plain"]["ops_per_token"] > 0


def test_doctor_refuses_a_decode_longer_than_the_context_in_one_line():
    r = run_doctor("--model-preset", "tiny", "--seq-len", "32", "--decode-tokens", "500")
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--decode-tokens 500" in lines[0] and "block_size 128" in lines[0]


def test_an_out_of_memory_step_is_reported_not_raised(monkeypatch, capsys):
    """On a Mac whose memory the config overshoots, the report says so and still times the decode."""
    from pocketlm.train import doctor

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("MPS backend out of memory (MPS allocated: 9.50 GB, other allocations: 0 bytes)\n"
                                     "Tried to allocate 1.00 GB on private pool.")
    monkeypatch.setattr(doctor, "train_step", out_of_memory)
    report = doctor.doctor(None, "cpu", 1, {"micro_batch": 2, "seq_len": 32}, "tiny", 10, 20)
    assert report["train"]["error"].startswith("MPS backend out of memory")
    assert report["train"]["micro_batch"] == 2 and report["train"]["planned"]["bytes"] > 0
    assert report["decode"]["plain"]["tokens"] == 10
