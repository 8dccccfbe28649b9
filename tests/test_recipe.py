"""The recipe's levers on CPU: Muon + AdamW (also under fp16 + GradScaler, the MPS path), z-loss,
QK-norm, the data-derived budget and its warnings, early stopping, and the transcript's measures."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.cache.dataset import PretrainData
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.hf_bridge import hf_config
from pocketlm.train import metrics
from pocketlm.train.budget import describe_budget, phase_budget, resolve_steps, train_tokens
from pocketlm.train.config import TrainConfig, warmup_for
from pocketlm.train.ddp import DistInfo
from pocketlm.train.loop import RunContext, run_phase, train_step, z_penalty
from pocketlm.train.muon import MuonAdamW, build_optimizer, orthogonalize, set_lr
from pocketlm.train.precision import Precision
from pocketlm.train.pretrain import pretrain_phase
from pocketlm.train.quickstart import recipe_config
from pocketlm.train.transcript import heldout_prompts, repeats_phrase

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(small_cache, shared_data) -> Path:
    return small_cache([("fineweb_edu:take=120", "pretrain"), ("roam:take=200", "pretrain"),
                        ("dolly:take=100", "sft")], shared_data)


def tiny_model(vocab: int, **over) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=vocab, block_size=64, **over))


def test_newton_schulz_approximates_the_polar_factor():
    g = torch.randn(2, 48, 96, generator=torch.Generator().manual_seed(0))
    u = orthogonalize(g)
    svals = torch.linalg.svdvals(u)
    assert svals.min() > 0.6 and svals.max() < 1.25  # near-orthogonal rows
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    polar = U @ Vh  # the exact answer the iteration approximates
    cos = torch.nn.functional.cosine_similarity(u.flatten(1), polar.flatten(1), dim=1)
    assert (cos > 0.9).all()
    assert orthogonalize(g.mT).mT.allclose(u, atol=1e-5)  # tall matrices take the transposed path


def test_muon_groups_split_hidden_matrices_from_embeddings_and_norms(small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size)
    cfg = TrainConfig(lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    opt = build_optimizer(model, cfg, cfg.lr, CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each parameter once
    for g in opt.param_groups:
        kinds = {names[id(p)].rsplit(".", 2)[-2] for p in g["params"]}  # qkv, out, gate_up, down, ln1, embed...
        if g["muon"]:
            assert kinds == {3: {"qkv"}, 2: {"gate_up"}, 1: {"out", "down"}}[g["blocks"]]
            assert g["lr"] == 0.02 and g["weight_decay"] == pytest.approx(0.1 * 1e-3 / 0.02)
        else:
            assert "embed" in kinds and g["weight_decay"] == 0.0 and all(
                p.dim() == 1 or names[id(p)] == "embed.weight" for p in g["params"])
    set_lr(opt, 5e-4)  # the schedule's LR, scaled per group
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([5e-4] + [0.01] * (len(opt.param_groups) - 1))
    sft = build_optimizer(model, cfg, 1e-4, CPU)  # SFT's lower peak lowers Muon's by the same factor
    assert max(g["lr"] for g in sft.param_groups) == pytest.approx(0.002)


def test_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonAdamW([{"params": [a], "muon": False, "lr": 1e-2, "weight_decay": 0.1}], betas=(0.9, 0.95))
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(10, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_muon_under_fp16_scaler_skips_overflow_then_trains_and_resumes_exactly(cache, small_tokenizer):
    """The MPS path (fp16 autocast + GradScaler) with Muon, on CPU: an overflowing step changes nothing,
    a good step moves the weights, and a state_dict round trip continues bit for bit."""
    batch = PretrainData(cache, {"fineweb_edu": 1.0}, 64, 0).batch(0, 2)
    model = tiny_model(small_tokenizer.vocab_size)
    cfg = TrainConfig(lr=1e-3, muon_lr=0.02)
    opt = build_optimizer(model, cfg, cfg.lr, CPU)
    prec = Precision.create(CPU, "fp16")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = model.blocks[0].mlp.down.weight.register_hook(lambda g: g * float("inf"))
    _, norm = train_step(model, opt, [batch], prec, 1.0, CPU, DistInfo())
    handle.remove()
    assert not torch.isfinite(norm) and prec.scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    train_step(model, opt, [batch], prec, 1.0, CPU, DistInfo())
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], model.blocks[0].attn.qkv.weight)
    twin = tiny_model(small_tokenizer.vocab_size)
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, cfg, cfg.lr, CPU)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk: no buffers shared
    for m, o in ((model, opt), (twin, twin_opt)):
        train_step(m, o, [batch], Precision.create(CPU, "fp32"), 1.0, CPU, DistInfo())
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_z_loss_is_the_masked_mean_square_logsumexp_and_leaves_the_reported_loss(cache, small_tokenizer):
    logits = torch.randn(2, 3, 7)
    y = torch.tensor([[1, -100, 2], [3, 4, -100]])
    lse = torch.logsumexp(logits, -1)
    want = torch.stack([lse[0, 0], lse[0, 2], lse[1, 0], lse[1, 1]]).square().mean()
    torch.testing.assert_close(z_penalty(logits, y), want)
    batch = PretrainData(cache, {"fineweb_edu": 1.0}, 64, 0).batch(0, 2)
    losses = []
    for z in (0.0, 1e-2):
        model = tiny_model(small_tokenizer.vocab_size)
        opt = build_optimizer(model, TrainConfig(), 0.0, CPU)
        loss, norm = train_step(model, opt, [batch], Precision.create(CPU, "fp32"), 0.0, CPU, DistInfo(), z)
        losses.append((float(loss), float(norm)))
    assert losses[0][0] == pytest.approx(losses[1][0]) and losses[0][1] != losses[1][1]


def test_qk_norm_is_off_by_default_changes_the_forward_and_refuses_llama_export(small_tokenizer):
    x = torch.randint(5, small_tokenizer.vocab_size, (1, 16))
    plain, normed = tiny_model(small_tokenizer.vocab_size), tiny_model(small_tokenizer.vocab_size, qk_norm=True)
    assert plain.blocks[0].attn.q_norm is None
    assert {n for n, _ in normed.named_parameters()} - {n for n, _ in plain.named_parameters()} == {
        f"blocks.{i}.attn.{w}_norm.weight" for i in range(2) for w in "qk"}
    assert not torch.allclose(plain(x)[0], normed(x)[0])
    with pytest.raises(PocketLMError, match="qk_norm"):
        hf_config(normed.cfg, 4, "float32")


def test_budget_from_tokens_epochs_or_steps_and_its_warnings(cache):
    cfg = TrainConfig(cache=str(cache), seq_len=64, micro_batch=4, accum_steps=2, epochs=6.0)
    train = phase_budget(dataclasses.replace(cfg, pretrain_steps=1), "pretrain")
    sizes = train_tokens(cache, ["fineweb_edu", "roam"])
    per_pass = sum(sizes.values())
    assert resolve_steps(cfg).pretrain_steps == -(-6 * per_pass // 512)  # epochs: ceil(6 passes / 512 per step)
    assert resolve_steps(dataclasses.replace(cfg, pretrain_steps=7)).pretrain_steps == 7  # explicit steps win
    assert resolve_steps(dataclasses.replace(cfg, pretrain_steps=7, tokens=5120)).pretrain_steps == 10  # tokens first
    with pytest.raises(PocketLMError, match="--tokens"):
        resolve_steps(dataclasses.replace(cfg, epochs=0.0))
    assert train.tokens == 512 and set(train.passes) == {"fineweb_edu", "roam"}
    long = phase_budget(resolve_steps(cfg), "pretrain")
    assert long.passes["fineweb_edu"] == pytest.approx(long.tokens * 0.95 / sizes["fineweb_edu"])
    lines = describe_budget([long], 1000.0, "chip", patience=3, eval_every=50)
    assert lines[0].startswith(f"plan pretrain: {long.steps:,} steps") and "(estimate)" in lines[0]
    warns = [line for line in lines if line.startswith("warning")]
    assert warns and all("early stopping will end it 3 evaluations (150 steps)" in w for w in warns)
    assert not [line for line in describe_budget([train], None, "cpu", 3, 50) if line.startswith("warning")]
    assert warmup_for(cfg, 200) == 10 and warmup_for(dataclasses.replace(cfg, warmup_steps=30), 20) == 20


def test_early_stopping_ends_the_phase_and_says_why(cache, small_tokenizer, tmp_path):
    # lr = 0: the validation loss can never improve after the first evaluation.
    cfg = TrainConfig(name="t", runs_dir=str(tmp_path), cache=str(cache), model="tiny", seq_len=64, micro_batch=2,
                      accum_steps=1, pretrain_steps=40, lr=0.0, eval_every=5, eval_batches=1, log_every=5,
                      sample_tokens=0, patience=2, device="cpu", eval_sources=())
    said = []
    run = RunContext(cfg, tmp_path / "t", CPU, small_tokenizer, DistInfo(), log=said.append)
    run.run_dir.mkdir(parents=True)
    run_phase(run, pretrain_phase(cfg, small_tokenizer), tiny_model(small_tokenizer.vocab_size), small_tokenizer.path)
    stops = [r for r in metrics.read(run.metrics_path) if r["kind"] == "stop"]
    assert [(r["step"], r["stale_evals"]) for r in stops] == [(15, 2)]
    assert any("stopped early at step 15 of 40" in m and "patience 2" in m for m in said)
    assert max(r["step"] for r in metrics.read(run.metrics_path)) == 15


def test_transcript_measures_and_prompts():
    assert repeats_phrase("the cat sat down. the cat sat down! The cat sat down?")
    assert not repeats_phrase("the cat sat down. the cat sat down. a dog ran off.")
    assert not repeats_phrase("coffee " * 2)
    prompts = heldout_prompts()
    assert len(prompts) == 30 and len(set(prompts)) == 30


def test_recipe_toml_tables_and_unknown_keys(tmp_path):
    cfg, path = recipe_config(Path(__file__).resolve().parents[1] / "configs" / "v1.toml", None)
    assert cfg.vocab_size == 16000 and cfg.transcript_max_tokens > 0 and "wikitext" in cfg.eval
    bad = tmp_path / "r.toml"
    bad.write_text("[recipe]\nvocab = 3\n")
    with pytest.raises(PocketLMError, match="vocab"):
        recipe_config(bad, None)


def test_transcript_asks_pocketlm_serve_through_the_openai_client(small_tokenizer, tmp_path):
    from pocketlm.model.io import save_model
    from pocketlm.train.transcript import ask_all, write_transcript

    ckpt = save_model(tmp_path / "m", tiny_model(small_tokenizer.vocab_size), small_tokenizer.path,
                      {"special_ids": small_tokenizer.special_token_ids()})
    prompts = heldout_prompts()[:2]
    replies = ask_all(ckpt, prompts, max_tokens=3, device="cpu")
    assert [(r.mode, r.prompt) for r in replies] == [(m, p) for m in ("greedy", "sampled") for p in prompts]
    assert all(r.finish_reason in ("stop", "length") for r in replies)
    stats = write_transcript(replies, tmp_path / "out", 3)
    assert stats["greedy"]["n"] == 2 and 0.0 <= stats["sampled"]["ended_on_eot"] <= 1.0
    assert (tmp_path / "out" / "transcript.md").read_text().count("**greedy**") == 2
