"""GPT: shapes, loss, a training step, the v1 parameter count, RoPE tables, per-document masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pocketlm import PocketLMError
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.config import swiglu_hidden
from pocketlm.model.rope import rope_tables


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=256)).eval()


def test_v1_shape_and_parameter_count():
    cfg = GPTConfig.v1()
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.head_dim, cfg.ffn_hidden) == \
        (16000, 1024, 8, 8, 512, 64, 1408)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        assert GPT(cfg).num_params() == 33_890_816


def test_swiglu_hidden_rule():
    assert [swiglu_hidden(c) for c in (64, 512, 768, 1024)] == [192, 1408, 2048, 2752]


def test_config_rejects_bad_shapes():
    with pytest.raises(PocketLMError, match="not divisible by n_head"):
        GPTConfig.tiny(n_embd=66, n_head=4)
    with pytest.raises(PocketLMError, match="must be even"):
        GPTConfig.tiny(n_embd=36, n_head=4)


def test_forward_shape_and_initial_loss(model: GPT):
    idx, targets = torch.randint(0, 256, (2, 3, 17))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 17, 256) and logits.dtype == torch.float32
    # Small init: the prediction is near uniform, so the loss on unrelated targets starts near ln(V).
    assert abs(loss.item() - math.log(256)) < 0.1
    assert model(idx)[1] is None


def test_loss_ignores_masked_targets(model: GPT):
    idx = torch.randint(0, 256, (2, 10))
    targets = idx.clone()
    targets[:, :4] = -100
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 256), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    # A batch with no target at all gives 0 rather than NaN.
    assert model(idx, torch.full_like(idx, -100))[1].item() == 0.0


def test_training_step_gives_finite_loss_and_grads(model: GPT):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_tied_embedding_is_the_output_projection(model: GPT):
    assert not any("head" in n for n in model.state_dict())
    # Changing one embedding row changes that token's logit everywhere, even for inputs without it.
    idx = torch.tensor([[1, 2, 3]])
    before = model(idx)[0]
    with torch.no_grad():
        model.embed.weight[200] += 1.0
    after = model(idx)[0]
    assert (after[..., 200] - before[..., 200]).abs().min() > 1e-3
    torch.testing.assert_close(after[..., :200], before[..., :200], rtol=0, atol=0)


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    cfg = GPTConfig.tiny(n_embd=256, n_head=4, n_layer=8)
    m = GPT(cfg)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert m.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    assert torch.equal(m.ln_final.weight, torch.ones(256))


def test_rope_tables_match_closed_form_at_1024():
    cos, sin = rope_tables(64, 1024, 10000.0)
    assert cos.shape == (1024, 64)
    for p, i in [(0, 0), (1, 0), (1023, 0), (1023, 5), (700, 31), (511, 17)]:
        angle = p * 10000.0 ** (-2 * i / 64)
        # half-split layout: frequency i sits at dims i and i + 32
        assert cos[p, i].item() == pytest.approx(math.cos(angle), abs=1e-7)
        assert cos[p, i + 32].item() == pytest.approx(math.cos(angle), abs=1e-7)
        assert sin[p, i].item() == pytest.approx(math.sin(angle), abs=1e-7)


def test_rope_tables_match_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    pos = torch.arange(1024)[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = rope_tables(64, 1024, 10000.0)
    # transformers builds the angles in fp32 (ulp of 1023 is 6e-5); ours are fp64 rounded once.
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=2e-4)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=2e-4)


def test_rope_extends_on_request(model: GPT):
    idx = torch.randint(0, 256, (1, 130))
    with pytest.raises(PocketLMError, match="extend_context"):
        model(idx)
    model.extend_context(256)
    cos, _ = rope_tables(model.cfg.head_dim, 256, model.cfg.rope_theta)
    assert torch.equal(model.rope.cos, cos)
    assert model(idx)[0].shape == (1, 130, 256)


def test_packed_documents_match_each_document_alone(model: GPT):
    torch.manual_seed(1)
    a, b = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 7))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    logits, _ = model(packed, positions=positions, doc_ids=doc_ids)
    torch.testing.assert_close(logits[:, :5], model(a)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, 5:], model(b)[0], rtol=0, atol=1e-5)
    # Without the mask the second document would see the first: the logits must differ.
    leaked, _ = model(packed, positions=positions)
    assert (leaked[:, 5:] - model(b)[0]).abs().max() > 1e-3


def test_explicit_positions_equal_default_positions(model: GPT):
    idx = torch.randint(0, 256, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    torch.testing.assert_close(model(idx, positions=pos)[0], model(idx)[0], rtol=0, atol=1e-6)
