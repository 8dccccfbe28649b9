"""The accelerated path's pieces against the plain ones, on the CPU: flex attention for packed
documents, the chunked linear + cross-entropy loss, and sampling without a random draw in the graph."""

from __future__ import annotations

import warnings

import pytest
import torch

from pocketlm.infer.graph_decode import choose
from pocketlm.infer.sampling import GenConfig
from pocketlm.model import GPT, GPTConfig
from pocketlm.model import loss as loss_module
from pocketlm.model.accel import accelerated


@pytest.fixture(scope="module")
def packed():
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=256))
    B, T = 2, 48
    x, y = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
    y[0, :7] = -100  # unsupervised tokens, as in SFT rows
    doc_ids = torch.tensor([[0] * 20 + [1] * 28, [0] * 5 + [1] * 30 + [2] * 13])
    positions = torch.cat([torch.arange(n) for n in (20, 28, 5, 30, 13)]).view(B, T)
    return model, x, y, positions, doc_ids


def test_flex_attention_matches_dense_document_mask(packed):
    model, x, _, positions, doc_ids = packed
    with torch.no_grad():  # flex attention has no CPU backward; its training runs are on CUDA
        dense, _ = model(x, positions=positions, doc_ids=doc_ids)
        model.use_flex_attention(True)
        try:
            with warnings.catch_warnings():  # "called without torch.compile": known, and once per process
                warnings.simplefilter("ignore")
                flex, _ = model(x, positions=positions, doc_ids=doc_ids)
        finally:
            model.use_flex_attention(False)
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


def test_chunked_loss_matches_full_logits_loss_and_gradients(packed, monkeypatch):
    model, x, y, positions, doc_ids = packed
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 40)  # several chunks, the last one partial
    _, want = model(x, y, positions=positions, doc_ids=doc_ids)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, got = model(x, y, positions=positions, doc_ids=doc_ids, return_logits=False)
    got.backward()
    assert logits is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_exponential_race_samples_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    cfg = GenConfig(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    noise = torch.empty(4)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[choose(logits, cfg, noise.exponential_(generator=g))] += 1
    torch.testing.assert_close(counts / 4000, torch.softmax(logits, 0), rtol=0, atol=0.03)
    assert int(choose(logits, GenConfig(temperature=0.0), noise)) == 2
    # top-k applies as in the eager sampler: excluded tokens are never chosen.
    assert all(int(choose(logits, GenConfig(temperature=1.0, top_k=2), noise.exponential_(generator=g))) in (1, 2)
               for _ in range(200))


def test_accelerated_path_is_off_on_cpu_unless_asked():
    assert not accelerated(torch.device("cpu"))
    assert accelerated(torch.device("cpu"), True)
    assert not accelerated(torch.device("cuda"), False)


def test_chunked_loss_under_bf16_autocast_matches_full_logits_loss(packed, monkeypatch):
    # The M4 and CUDA run the loss under autocast: the matmuls in the autocast dtype, the softmax in fp32.
    model, x, y, positions, doc_ids = packed
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 40)
    runs = []
    for return_logits in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y, positions=positions, doc_ids=doc_ids, return_logits=return_logits)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (want, want_grads), (got, got_grads) = runs
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0.05, atol=2e-3)
    model.zero_grad()


def test_compiled_cuda_training_takes_flex_attention_and_evaluation_does_not(packed, monkeypatch):
    from pocketlm.model import attention
    from pocketlm.train import ddp
    from pocketlm.train.config import TrainConfig
    from pocketlm.train.evaluate import evaluate

    model, x, y, positions, doc_ids = packed
    # Only where its compiled gradients were checked against eager: CUDA (no CPU backward exists).
    for device, on in (("cuda", True), ("cpu", False)):
        model.use_flex_attention(False)
        ddp.wrap(model, TrainConfig(compile=True), torch.device(device), ddp.DistInfo())
        assert model.flex_attention is on, device
    # Evaluation runs the model eagerly, where flex attention would be unfused: the dense mask there.
    model.use_flex_attention(True)
    want = evaluate(model, [{"x": x, "y": y, "positions": positions, "doc_ids": doc_ids}], torch.ones(256),
                    torch.device("cpu"))

    def no_flex(*args, **kwargs):
        raise AssertionError("evaluation called flex attention")

    monkeypatch.setattr(attention, "flex_attention", no_flex)
    got = evaluate(model, [{"x": x, "y": y, "positions": positions, "doc_ids": doc_ids}], torch.ones(256),
                   torch.device("cpu"))
    assert got == want and model.flex_attention
    model.use_flex_attention(False)
