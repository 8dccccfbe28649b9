"""Training runs on real data: phases and checkpoints, best-per-phase, accumulation, activation
checkpointing, fp16 overflow handling, resume after kill -9, and 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.cache.build_cache import build_cache
from pocketlm.cache.dataset import PretrainData, SFTData
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.io import load_model
from pocketlm.train import metrics
from pocketlm.train.checkpoint import load_state
from pocketlm.train.config import TrainConfig
from pocketlm.train.ddp import DistInfo, checkpoint_blocks
from pocketlm.train.evaluate import eval_checkpoint
from pocketlm.train.loop import RunContext, run_phase, train_step
from pocketlm.train.plot import plot_run
from pocketlm.train.optim import build_adamw
from pocketlm.train.precision import MAX_SKIPPED_STEPS, Precision
from pocketlm.train.pretrain import pretrain_phase
from pocketlm.train.run import train

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(small_tokenizer, shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_cache") / "cache"
    specs = [("fineweb_edu:take=200", "pretrain"), ("roam:take=300", "pretrain"), ("wikitext:take=100", "pretrain"),
             ("dolly:take=400", "sft"), ("oasst1:take=80", "sft"), ("primer", "sft")]
    build_cache(small_tokenizer.path, specs, out, data_dir=shared_data, workers=1, val_fraction=0.1, progress=False)
    return out


def tiny_config(cache: Path, runs: Path, **over) -> TrainConfig:
    values = dict(name="t", runs_dir=str(runs), cache=str(cache), model="tiny", seq_len=64, micro_batch=4,
                  accum_steps=1, pretrain_steps=200, sft_steps=200, lr=3e-3, sft_lr=1e-3, warmup_steps=10,
                  eval_every=50, eval_batches=2, log_every=10, sample_tokens=4, device="cpu")
    values.update(over)
    return TrainConfig(**values)


def write_toml(path: Path, cfg: TrainConfig) -> Path:
    def val(v):
        return json.dumps(list(v) if isinstance(v, tuple) else v)
    rows = [f"{k} = {val(v)}" for k, v in vars(cfg).items() if v is not None]
    path.write_text("[train]\n" + "\n".join(rows) + "\n")
    return path


def train_lines(run_dir: Path, phase: str) -> list[dict]:
    return [r for r in metrics.read(run_dir / "metrics.jsonl") if r["kind"] == "train" and r["phase"] == phase]


def judged(run_dir: Path, phase: str) -> list[dict]:
    return [r for r in metrics.read(run_dir / "metrics.jsonl")
            if r["kind"] == "eval" and r["phase"] == phase and r["source"] == "all"]


def test_pipeline_trains_both_phases_and_keeps_best_per_phase(cache, tmp_path):
    cfg = tiny_config(cache, tmp_path)
    train(cfg, pipeline="pretrain")
    run_dir = tmp_path / "t"
    pre_best = (run_dir / "pretrain" / "best" / "model.safetensors").read_bytes()
    best_sft = train(cfg, pipeline="sft")
    assert best_sft == run_dir / "sft" / "best"

    for phase in ("pretrain", "sft"):
        lines = train_lines(run_dir, phase)
        assert [r["step"] for r in lines] == list(range(10, 201, 10))
        assert set(lines[0]) >= {"step", "phase", "loss", "lr", "grad_norm", "tok_per_s", "dt_ms"}
        assert lines[-1]["loss"] < lines[0]["loss"] - 0.5  # it learned something
        evals = judged(run_dir, phase)
        assert [r["step"] for r in evals] == [50, 100, 150, 200]
        best_meta = json.loads((run_dir / phase / "best" / "model.json").read_text())["meta"]
        assert best_meta["phase"] == phase
        assert best_meta["val_loss"] == min(r["loss"] for r in evals)
        assert load_state(run_dir / phase / "last")["step"] == 200
    # SFT wrote its own best/ and left the pretrain best/ alone.
    assert (run_dir / "pretrain" / "best" / "model.safetensors").read_bytes() == pre_best
    per_source = {r["source"] for r in metrics.read(run_dir / "metrics.jsonl")
                  if r["kind"] == "eval" and r["phase"] == "pretrain"}
    assert per_source == {"fineweb_edu", "roam", "wikitext", "all"}
    bpb = [r["bpb"] for r in metrics.read(run_dir / "metrics.jsonl") if r["kind"] == "eval" and "bpb" in r]
    assert all(0.5 < b < 8 for b in bpb)
    assert json.loads((run_dir / "config.json").read_text())["train"]["seq_len"] == 64
    model, tok, _ = load_model(run_dir / "sft" / "best")
    assert model.cfg.vocab_size == tok.vocab_size
    # `pocketlm eval` reproduces the numbers the run logged for its best SFT checkpoint.
    best_step = json.loads((run_dir / "sft" / "best" / "model.json").read_text())["meta"]["step"]
    logged = {r["source"]: r for r in metrics.read(run_dir / "metrics.jsonl")
              if r["kind"] == "eval" and r["phase"] == "sft" and r["step"] == best_step and "bpb" in r}
    again = eval_checkpoint(run_dir / "sft" / "best", cache, max_batches=2, batch_size=4, device_name="cpu")
    for source in ("dolly", "oasst1"):
        assert again[source].loss == pytest.approx(logged[source]["loss"], rel=1e-5)
        assert again[source].bpb == pytest.approx(logged[source]["bpb"], rel=1e-5)
    assert [p.name for p in plot_run(run_dir)] == ["loss.png", "bpb.png"]


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def grads_of_step(model: GPT, batches: list[dict], prec: str = "fp32") -> tuple[float, torch.Tensor]:
    """Loss and gradient of one train_step (captured just before the optimizer applies it)."""
    opt = build_adamw(model, 0.0, 0.0, 0.95, CPU)
    seen: dict[str, torch.Tensor] = {}

    def capture(_opt, _args, _kwargs) -> None:
        seen["g"] = flat_grads(model).clone()
    opt.register_step_pre_hook(capture)
    loss, _ = train_step(model, opt, batches, Precision.create(CPU, prec), 0.0, CPU, DistInfo())
    return float(loss), seen["g"]


def concat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in ("x", "y", "positions", "doc_ids")}


def fresh_model(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=vocab, block_size=64))


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_accumulation_matches_one_big_batch(cache, small_tokenizer, kind):
    data = (PretrainData(cache, {"fineweb_edu": 1.0}, 64, 0) if kind == "pretrain"
            else SFTData(cache, ["dolly", "oasst1"], 64, 0))
    a, b = data.batch(0, 4), data.batch(1, 4)
    if kind == "sft":  # the two halves carry different numbers of loss tokens: weighting matters
        assert int((a["y"] != -100).sum()) != int((b["y"] != -100).sum())
    loss_acc, g_acc = grads_of_step(fresh_model(small_tokenizer.vocab_size), [a, b])
    loss_big, g_big = grads_of_step(fresh_model(small_tokenizer.vocab_size), [concat(a, b)])
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    assert torch.nn.functional.cosine_similarity(g_acc, g_big, dim=0) > 0.999
    torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients(cache, small_tokenizer):
    batch = SFTData(cache, ["dolly"], 64, 0).batch(0, 4)
    loss_plain, g_plain = grads_of_step(fresh_model(small_tokenizer.vocab_size), [batch])
    model = fresh_model(small_tokenizer.vocab_size)
    checkpoint_blocks(model)
    loss_ckpt, g_ckpt = grads_of_step(model, [batch])
    assert set(model.state_dict()) == set(fresh_model(small_tokenizer.vocab_size).state_dict())
    assert loss_ckpt == loss_plain
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-7)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(cache, small_tokenizer, mps_rules):
    # Under MPS's rules: CPU fp16 autocast and GradScaler("cpu") stand in for MPS's (torch's scaler
    # reciprocates the scale in fp64 off MPS, in fp32 on it: the one fp64 use the mode allows).
    batch = PretrainData(cache, {"fineweb_edu": 1.0}, 64, 0).batch(0, 2)
    model = fresh_model(small_tokenizer.vocab_size)
    opt = build_adamw(model, 1e-3, 0.1, 0.95, CPU)
    prec = Precision.create(CPU, "fp16")
    assert prec.scaler.is_enabled()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = model.blocks[0].mlp.down.weight.register_hook(lambda g: g * float("inf"))
    _, grad_norm = train_step(model, opt, [batch], prec, 1.0, CPU, DistInfo())
    assert float(grad_norm) == float("inf")
    assert prec.scaler.get_scale() == 2.0 ** 15  # halved from the initial 2**16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # step skipped
    handle.remove()
    _, grad_norm = train_step(model, opt, [batch], prec, 1.0, CPU, DistInfo())
    assert torch.isfinite(grad_norm)
    assert not torch.equal(before["blocks.0.mlp.down.weight"], model.blocks[0].mlp.down.weight)


def test_persistent_overflow_falls_back_to_fp32_then_stops_with_last_good_checkpoint(cache, small_tokenizer, tmp_path):
    cfg = tiny_config(cache, tmp_path, precision="fp16", pretrain_steps=30, eval_every=10, log_every=5,
                      sample_tokens=0, eval_sources=(), eval_batches=1)
    run = RunContext(cfg, tmp_path / "t", CPU, small_tokenizer, DistInfo(), log=lambda _m: None)
    run.run_dir.mkdir(parents=True)
    model = fresh_model(small_tokenizer.vocab_size)
    calls = {"n": 0}

    def poison_after_step_5(g):  # one hook call per optimizer step (accum_steps=1)
        calls["n"] += 1
        return g * float("inf") if calls["n"] > 5 else g
    model.blocks[1].attn.qkv.weight.register_hook(poison_after_step_5)
    with pytest.raises(PocketLMError, match=r"steps (\d+)-(\d+) in fp32 .*last good checkpoint: .*pretrain/last") as err:
        run_phase(run, pretrain_phase(cfg, small_tokenizer), model, small_tokenizer.path)
    # Steps 6..15 overflow in fp16 and are skipped; after the 10th fp32 takes over, and step 16 is
    # non-finite in fp32 too: its update is skipped on the device, and the next log line (step 20) stops.
    assert f"steps {5 + MAX_SKIPPED_STEPS + 1}-20 in fp32" in str(err.value)
    state = load_state(run.run_dir / "pretrain" / "last")
    assert state["step"] == 10 and state["precision"]["mode"] == "fp16"
    assert state["precision"]["scaler"]["scale"] == 2.0 ** (16 - 5)  # halved once per skipped step 6..10
    reloaded, _, _ = load_model(run.run_dir / "pretrain" / "last")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
    lines = train_lines(run.run_dir, "pretrain")
    assert [(r["step"], r["precision"], r["skipped"]) for r in lines] == [(5, "fp16", 0), (10, "fp16", 5),
                                                                           (15, "fp32", 5)]


def cli(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_resume_after_kill_9_reproduces_the_uninterrupted_losses(cache, tmp_path):
    cfg = tiny_config(cache, tmp_path, pretrain_steps=80, eval_every=20, log_every=2, sample_tokens=0)
    config = write_toml(tmp_path / "run.toml", cfg)
    base = ["-m", "pocketlm", "train", "--config", str(config), "--phase", "pretrain"]
    straight = cli(*base, "--name", "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    killed = cli(*base, "--name", "killed")
    last = tmp_path / "killed" / "pretrain" / "last"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert load_state(last)["step"] < 80
    resumed = cli(*base, "--name", "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    want = [(r["step"], r["loss"], r["grad_norm"]) for r in train_lines(tmp_path / "straight", "pretrain")]
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in train_lines(tmp_path / "killed", "pretrain")]
    assert len(want) == 40 and got == want


def test_two_process_gloo_ddp_matches_one_process_on_the_same_global_batch(cache, tmp_path):
    cfg = tiny_config(cache, tmp_path, pretrain_steps=20, eval_every=20, log_every=2, micro_batch=2,
                      sample_tokens=0, eval_batches=1)
    config = write_toml(tmp_path / "run.toml", cfg)
    base = ["train", "--config", str(config), "--phase", "pretrain"]
    single = cli("-m", "pocketlm", *base, "--name", "single", "--accum-steps", "2")
    assert single.wait(timeout=300) == 0, single.stderr.read()
    ddp = cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
              "-m", "pocketlm", *base, "--name", "ddp", "--accum-steps", "1")
    assert ddp.wait(timeout=300) == 0, ddp.stderr.read()

    one = train_lines(tmp_path / "single", "pretrain")
    two = train_lines(tmp_path / "ddp", "pretrain")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(2, 21, 2))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    m1, _, _ = load_model(tmp_path / "single" / "pretrain" / "last")
    m2, _, _ = load_model(tmp_path / "ddp" / "pretrain" / "last")
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_non_finite_step_is_skipped_on_the_device_without_fp16(cache, small_tokenizer, mode):
    batch = PretrainData(cache, {"fineweb_edu": 1.0}, 64, 0).batch(0, 2)
    model = fresh_model(small_tokenizer.vocab_size)
    opt = build_adamw(model, 1e-3, 0.1, 0.95, CPU)
    prec = Precision.create(CPU, mode)
    train_step(model, opt, [batch], prec, 1.0, CPU, DistInfo())  # one good step: the state exists
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps_before = [s["step"].clone() for s in opt.state.values()]
    handle = model.blocks[0].mlp.down.weight.register_hook(lambda g: g * float("nan"))
    _, grad_norm = train_step(model, opt, [batch], prec, 1.0, CPU, DistInfo())
    handle.remove()
    assert isinstance(grad_norm, torch.Tensor) and not torch.isfinite(grad_norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(s["exp_avg_sq"]).all() for s in opt.state.values())
    assert [s["step"] for s in opt.state.values()] == steps_before  # AdamW's bias correction unmoved
