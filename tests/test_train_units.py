"""Pure pieces of the training runner: LR schedule, AdamW groups, precision choices, MFU table,
checkpoint writing, metrics truncation and config reading."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.model import GPT, GPTConfig
from pocketlm.train import metrics
from pocketlm.train.checkpoint import load_state, save_checkpoint
from pocketlm.train.cli import read_config, register
from pocketlm.train.optim import build_adamw, param_groups
from pocketlm.train.precision import MAX_SKIPPED_STEPS, Precision, peak_flops, resolve_precision
from pocketlm.train.pretrain import parse_mix
from pocketlm.train.schedule import lr_at

CPU = torch.device("cpu")


def test_cosine_schedule_values():
    lrs = [lr_at(s, 1.0, total=110, warmup=10, min_frac=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[109] == pytest.approx(0.1)
    assert lrs[10 + 99 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_wsd_schedule_holds_then_decays_linearly():
    lrs = [lr_at(s, 2.0, total=100, warmup=10, min_frac=0.1, schedule="wsd", decay_frac=0.2) for s in range(100)]
    assert lrs[10:80] == [2.0] * 70
    assert lrs[80] == 2.0 and lrs[99] == pytest.approx(0.2)
    assert lrs[90] == pytest.approx(2.0 - 1.8 * 10 / 19)
    with pytest.raises(PocketLMError, match="schedule"):
        lr_at(0, 1.0, 10, 1, schedule="linear")


def test_no_weight_decay_on_norms_and_embeddings():
    model = GPT(GPTConfig.tiny(vocab_size=300))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "embed.weight", "ln_final.weight", *(f"blocks.{i}.{ln}.weight" for i in range(2) for ln in ("ln1", "ln2"))}
    assert len(decay["params"]) == 2 * 4  # qkv, out, gate_up, down per block
    opt = build_adamw(model, 1e-3, 0.1, 0.95, CPU)
    assert opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.95)


def test_precision_choice_per_device():
    assert resolve_precision(torch.device("cuda"), "auto") == "bf16"
    assert resolve_precision(torch.device("mps"), "auto") == "fp16"
    assert resolve_precision(CPU, "auto") == "fp32"
    assert resolve_precision(CPU, "bf16") == "bf16"
    with pytest.raises(PocketLMError, match="precision"):
        resolve_precision(CPU, "fp8")


def test_peak_flops_table_and_unknown_devices():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("Apple M4 Max", "fp16") == 18.4e12
    assert peak_flops("x86_64", "fp32") is None
    assert peak_flops("NVIDIA GeForce GTX 1080", "fp32") is None


def test_fp16_gives_up_after_persistent_overflow_only():
    prec = Precision.create(CPU, "fp16")
    for _ in range(MAX_SKIPPED_STEPS - 1):
        assert prec.after_step(False) is False
    assert prec.after_step(True) is False and prec.skipped_in_a_row == 0  # a good step resets the count
    switched = [prec.after_step(False) for _ in range(MAX_SKIPPED_STEPS)]
    assert switched == [False] * (MAX_SKIPPED_STEPS - 1) + [True]
    assert prec.mode == "fp32" and not prec.scaler.is_enabled()
    restored = Precision.create(CPU, "fp16")
    restored.load_state_dict(prec.state_dict())
    assert restored.mode == "fp32" and not restored.scaler.is_enabled()


def test_precision_state_carries_the_loss_scale_across_a_resume():
    run = Precision.create(CPU, "fp16")
    run.scaler.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    run.scaler.update(new_scale=1024.0)
    resumed = Precision.create(CPU, "fp16")
    resumed.load_state_dict(run.state_dict())
    assert resumed.scaler.get_scale() == 1024.0
    moved = Precision.create(CPU, "bf16")  # resumed on a device whose precision is bf16
    moved.load_state_dict(run.state_dict())
    assert moved.mode == "bf16" and not moved.scaler.is_enabled()


def test_checkpoint_swaps_atomically_and_refuses_non_finite_weights(small_tokenizer, tmp_path):
    model = GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size))
    phase = tmp_path / "pretrain"
    save_checkpoint(phase, "last", model, small_tokenizer.path, {"step": 1}, {"step": 1})
    first = (phase / "last").resolve()
    save_checkpoint(phase, "last", model, small_tokenizer.path, {"step": 2}, {"step": 2})
    assert load_state(phase / "last")["step"] == 2
    assert not first.exists() and len(list(phase.iterdir())) == 2  # the symlink and its folder
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    with pytest.raises(PocketLMError, match="non-finite"):
        save_checkpoint(phase, "last", model, small_tokenizer.path, {"step": 3}, {"step": 3})
    assert load_state(phase / "last")["step"] == 2


def test_metrics_truncated_to_the_resumed_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for phase, step in [("pretrain", 10), ("pretrain", 20), ("pretrain", 30), ("sft", 10)]:
        metrics.append(path, {"kind": "train", "phase": phase, "step": step})
    metrics.truncate_after(path, "pretrain", 20)
    assert [(r["phase"], r["step"]) for r in metrics.read(path)] == [("pretrain", 10), ("pretrain", 20)]


def test_parse_mix():
    assert parse_mix(("fineweb_edu=0.95", "roam=0.05")) == {"fineweb_edu": 0.95, "roam": 0.05}
    assert parse_mix(("embedded",)) == {"embedded": 1.0}
    with pytest.raises(PocketLMError, match="SOURCE=WEIGHT"):
        parse_mix(("roam=lots",))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def test_config_layers_and_unknown_keys(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nmicro_batch = 2\nlr = 1e-3\n[model]\nn_layer = 3\n')
    cfg, model = read_config(parse(["--config", str(toml), "--lr", "5e-4", "--model-n-embd", "96"]))
    assert (cfg.micro_batch, cfg.lr, cfg.accum_steps) == (2, 5e-4, 8)
    assert model == {"n_layer": 3, "n_embd": 96}
    toml.write_text('[train]\nmicro_bach = 2\n')
    with pytest.raises(PocketLMError, match="micro_bach"):
        read_config(parse(["--config", str(toml)]))
    toml.write_text('[optim]\nlr = 1\n')
    with pytest.raises(PocketLMError, match="optim"):
        read_config(parse(["--config", str(toml)]))
