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
from pocketlm.infer.kv_cache import KVCache
from pocketlm.infer.sampling import GenConfig
from pocketlm.model import GPT, GPTConfig
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


def test_two_concurrent_generations_match_sequential():
    _, model = tiny_pair()

    class Tok:  # the byte-level minimum generate() needs
        vocab_size, eot_id = VOCAB, 3

        def id_to_bytes(self, i: int) -> bytes:
            return bytes([i % 256])

        def decode(self, ids: list[int], skip_special: bool = False) -> str:
            return bytes(i % 256 for i in ids).decode("latin-1")

    tok = Tok()
    cfgs = [GenConfig(max_new_tokens=24, temperature=1.0, top_k=50, seed=s, top_alternatives=3) for s in (1, 2)]
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
