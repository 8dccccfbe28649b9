"""On a real Apple GPU: the checks the MPS-rules mode cannot make on the CPU (kernel results).

Skipped wherever MPS is not available. Needs nothing outside the repository: a tiny model with
seeded random weights, compared with the same model on the CPU. On a Mac:
`.venv/bin/python -m pytest -q tests/test_mps_device.py` (README, "On an Apple M4").
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from pocketlm.device import DeviceLock
from pocketlm.infer.generate import generate
from pocketlm.model.kv_cache import KVCache
from pocketlm.infer.sampling import GenConfig
from pocketlm.model import GPT, GPTConfig, attention
from pocketlm.train.ddp import DistInfo
from pocketlm.train.evaluate import evaluate
from pocketlm.train.loop import train_step
from pocketlm.train.optim import build_adamw
from pocketlm.train.precision import Precision

pytestmark = pytest.mark.skipif(not torch.backends.mps.is_available(),
                                reason="needs an Apple GPU (torch.backends.mps.is_available() is False)")

CPU, MPS = torch.device("cpu"), torch.device("mps")
VOCAB, T = 512, 96


def tiny_pair() -> tuple[GPT, GPT]:
    """The same seeded model on the CPU and on MPS, fp32."""
    torch.manual_seed(0)
    cpu = GPT(GPTConfig.tiny(vocab_size=VOCAB, block_size=T)).eval()
    return cpu, copy.deepcopy(cpu).to(MPS)


def batch(seed: int, rows: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, T + 1), generator=g)
    return {"x": ids[:, :-1], "y": ids[:, 1:], "positions": torch.arange(T).repeat(rows, 1),
            "doc_ids": torch.zeros(rows, T, dtype=torch.long)}


def test_fp16_step_with_forced_overflow_leaves_weights_unchanged():
    _, model = tiny_pair()
    model.train()
    opt = build_adamw(model, 1e-3, 0.1, 0.95, MPS)
    prec = Precision.create(MPS, "fp16")
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    handle = model.blocks[0].mlp.down.weight.register_hook(lambda g: g * float("inf"))
    _, grad_norm = train_step(model, opt, [batch(0)], prec, 1.0, MPS, DistInfo())
    handle.remove()
    assert not torch.isfinite(grad_norm.cpu())
    assert prec.scaler.get_scale() == 2.0 ** 15
    after = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # no NaN, nothing applied
    train_step(model, opt, [batch(1)], prec, 1.0, MPS, DistInfo())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before["blocks.0.mlp.down.weight"], model.blocks[0].mlp.down.weight.detach().cpu())


def test_evaluate_on_mps_matches_cpu():
    cpu, mps = tiny_pair()
    lengths = np.random.default_rng(0).integers(1, 6, VOCAB)
    batches = [batch(s) for s in range(3)]
    on_cpu = evaluate(cpu, batches, lengths, CPU)
    on_mps = evaluate(mps, batches, lengths, MPS)
    assert on_mps.tokens == on_cpu.tokens and on_mps.text_bytes == on_cpu.text_bytes
    assert on_mps.loss == pytest.approx(on_cpu.loss, rel=1e-4)
    assert on_mps.bpb == pytest.approx(on_cpu.bpb, rel=1e-4)


def test_cached_decoding_to_kv_lengths_33_to_70_matches_cpu():
    """MPS SDPA has been wrong for KV lengths that are not a multiple of 32 (pytorch PR #169222)."""
    cpu, mps = tiny_pair()
    ids = batch(7, rows=1)["x"][:, :70]
    logits = {}
    for name, model, device in (("cpu", cpu, CPU), ("mps", mps, MPS)):
        cache = KVCache(model.cfg, 1, 70, device, torch.float32)
        rows = []
        with torch.inference_mode():
            model(ids[:, :32].to(device), cache=cache)
            for pos in range(32, 70):  # each forward leaves pos + 1 keys: lengths 33..70
                out, _ = model(ids[:, pos:pos + 1].to(device), cache=cache)
                rows.append(out[0, -1].cpu())
        logits[name] = torch.stack(rows)
    torch.testing.assert_close(logits["mps"], logits["cpu"], atol=2e-4, rtol=1e-4)


def v1_attention_pair() -> tuple[GPT, GPT]:
    """v1's attention shape (head_dim 64, 8 heads: the shape MPS runs through its fast vector kernels for
    up to 8 queries) in a 2-layer model, the same seeded weights on the CPU and on MPS, fp32."""
    torch.manual_seed(0)
    v1 = GPTConfig.v1()
    cfg = GPTConfig.tiny(vocab_size=VOCAB, block_size=128, n_layer=2, n_embd=v1.n_embd, n_head=v1.n_head)
    assert (cfg.head_dim, cfg.n_head) == (64, 8)
    cpu = GPT(cfg).eval()
    return cpu, copy.deepcopy(cpu).to(MPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_sdpa_self_check_passes_at_v1s_shape(dtype):
    cases = attention.sdpa_self_check(MPS, 64, 8, dtype)
    assert all(c["ok"] for c in cases), [c for c in cases if not c["ok"]]


def test_v1_shaped_cached_decoding_to_kv_lengths_31_to_96_matches_cpu():
    """One-query decode at v1's head_dim from 30 cached keys: KV lengths 31, 32, 33 ... 64 ... 95, 96,
    through the cache's strided views (no copy before SDPA from torch 2.13)."""
    cpu, mps = v1_attention_pair()
    ids = batch(11, rows=1)["x"][:, :96]
    logits = {}
    for name, model, device in (("cpu", cpu, CPU), ("mps", mps, MPS)):
        cache = KVCache(model.cfg, 1, 96, device, torch.float32)
        rows = []
        with torch.inference_mode():
            model(ids[:, :30].to(device), cache=cache)
            for pos in range(30, 96):
                out, _ = model(ids[:, pos:pos + 1].to(device), cache=cache)
                rows.append(out[0, -1].cpu())
        logits[name] = torch.stack(rows)
    assert not any(k[1] == 64 and not ok for k, ok in attention._SDPA_TRUSTED.items())  # no fallback taken
    torch.testing.assert_close(logits["mps"], logits["cpu"], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_len", [31, 33, 64, 95])
def test_v1_shaped_blocks_of_8_queries_after_a_filled_cache_match_cpu(kv_len):
    """8 new tokens after kv_len - 8 cached ones (a boolean mask, MPS's vector kernel), then one more."""
    cpu, mps = v1_attention_pair()
    ids = batch(kv_len, rows=1)["x"][:, :kv_len + 1]
    outs = {}
    for name, model, device in (("cpu", cpu, CPU), ("mps", mps, MPS)):
        cache = KVCache(model.cfg, 1, kv_len + 1, device, torch.float32)
        with torch.inference_mode():
            model(ids[:, :kv_len - 8].to(device), cache=cache)
            block, _ = model(ids[:, kv_len - 8:kv_len].to(device), cache=cache)
            last, _ = model(ids[:, kv_len:].to(device), cache=cache)
        outs[name] = torch.cat([block[0], last[0]]).cpu()
    torch.testing.assert_close(outs["mps"], outs["cpu"], atol=2e-4, rtol=1e-4)


def test_two_concurrent_generations_match_sequential():
    _, model = tiny_pair()

    class Tok:  # the byte-level minimum generate() needs
        vocab_size, eot_id = VOCAB, 3

        def id_to_bytes(self, i: int) -> bytes:
            return bytes([i % 256])

        def decode(self, ids: list[int], skip_special: bool = False) -> str:
            return bytes(i % 256 for i in ids).decode("latin-1")

    tok = Tok()
    cfgs = [GenConfig(max_new_tokens=24, temperature=1.0, top_k=50, seed=s) for s in (1, 2)]
    prompts = [[10, 11, 12, 13], [20, 21, 22]]
    alone = [[s.id for s in generate(model, tok, p, c)] for p, c in zip(prompts, cfgs)]
    lock, results, errors = DeviceLock(), [None, None], []
    start = threading.Barrier(2)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = [s.id for s in generate(model, tok, prompts[i], cfgs[i], lock=lock)]
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == alone
