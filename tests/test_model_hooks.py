"""Hook points: TransformerLens names, caching, observation without side effects, ablation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocketlm import PocketLMError
from pocketlm.model.kv_cache import KVCache
from pocketlm.model import GPT, GPTConfig

SCORE_HOOKS = ("attn.hook_attn_scores", "attn.hook_pattern")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=256)).eval()


@pytest.fixture(scope="module")
def idx() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 12))


def test_transformer_lens_names_are_present(model: GPT):
    per_block = ["hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                 "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
                 "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_pre_linear",
                 "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
    expected = ["hook_embed"] + [f"blocks.{i}.{n}" for i in range(2) for n in per_block] + ["ln_final.hook_normalized"]
    assert model.hook_names() == expected  # in the order they fire
    assert model.hook_names(lambda n: n.endswith("hook_z")) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]


def test_run_with_cache_returns_the_activations_the_forward_used(model: GPT, idx: torch.Tensor):
    logits, cache = model.run_with_cache(idx)
    assert set(cache) == set(model.hook_names())
    shapes = {"hook_embed": (2, 12, 64), "blocks.0.attn.hook_q": (2, 12, 4, 16),
              "blocks.1.attn.hook_pattern": (2, 4, 12, 12), "blocks.0.mlp.hook_post": (2, 12, 192)}
    assert {n: tuple(cache[n].shape) for n in shapes} == shapes
    torch.testing.assert_close(cache["hook_embed"], model.embed.weight[idx], rtol=0, atol=0)
    # The last residual stream through the final norm and the tied unembedding gives the logits.
    relogits = F.linear(model.ln_final(cache["blocks.1.hook_resid_post"]), model.embed.weight)
    torch.testing.assert_close(relogits, logits, rtol=0, atol=1e-6)
    # Residual bookkeeping: mid = pre + attn_out, post = mid + mlp_out.
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"],
                               cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"], rtol=0, atol=0)
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 12), rtol=0, atol=1e-6)
    assert torch.count_nonzero(pattern.triu(1)) == 0  # causal: nothing from the future


def test_run_with_cache_name_filters(model: GPT, idx: torch.Tensor):
    _, cache = model.run_with_cache(idx, names=["blocks.1.hook_resid_post", "hook_embed"])
    assert set(cache) == {"blocks.1.hook_resid_post", "hook_embed"}
    _, cache = model.run_with_cache(idx, names=lambda n: n.startswith("blocks.0.mlp"))
    assert set(cache) == {"blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post"}
    with pytest.raises(PocketLMError, match="unknown hook point"):
        model.run_with_cache(idx, names=["blocks.0.hook_nope"])


def test_observing_hooks_leave_logits_bit_identical(model: GPT, idx: torch.Tensor):
    plain, _ = model(idx)
    observed, cache = model.run_with_cache(idx, names=lambda n: not n.endswith(SCORE_HOOKS))
    assert len(cache) == len(model.hook_names()) - 4
    assert torch.equal(plain, observed)
    assert torch.equal(plain, model(idx)[0])  # nothing left attached
    assert all(not hp.has_hooks() for hp in model.hook_dict.values())


def test_explicit_attention_matches_sdpa(model: GPT, idx: torch.Tensor):
    """Hooking the pattern switches to explicit attention; outputs agree to fp tolerance, masks included."""
    names = lambda n: n.endswith(SCORE_HOOKS)  # noqa: E731
    torch.testing.assert_close(model.run_with_cache(idx, names=names)[0], model(idx)[0], rtol=0, atol=1e-5)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7] * 2)
    kw = dict(doc_ids=doc_ids, positions=torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12))
    logits, cache = model.run_with_cache(idx, names=names, **kw)
    torch.testing.assert_close(logits, model(idx, **kw)[0], rtol=0, atol=1e-5)
    assert torch.count_nonzero(cache["blocks.0.attn.hook_pattern"][..., 5:, :5]) == 0  # no cross-document
    kv = KVCache(model.cfg, 2, 12, "cpu", torch.float32)
    model(idx[:, :7], cache=kv)
    step, cache = model.run_with_cache(idx[:, 7:9], names=names, cache=kv)  # chunk after a filled cache
    torch.testing.assert_close(step, model(idx)[0][:, 7:9], rtol=0, atol=1e-5)
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 4, 2, 9)


def test_zero_ablation_of_every_block_leaves_only_embed_and_unembed(model: GPT, idx: torch.Tensor):
    zero = lambda t, hook: torch.zeros_like(t)  # noqa: E731
    logits, _ = model.run_with_hooks(idx, fwd_hooks=[(lambda n: n.endswith(("hook_attn_out", "hook_mlp_out")), zero)])
    expected = F.linear(model.ln_final(model.embed(idx)), model.embed.weight)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_pattern_ablation_changes_logits(model: GPT, idx: torch.Tensor):
    plain, _ = model(idx)

    def uniform_causal(t: torch.Tensor, hook) -> torch.Tensor:
        mask = torch.ones_like(t).tril()
        return mask / mask.sum(-1, keepdim=True)

    ablated, _ = model.run_with_hooks(idx, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform_causal)])
    assert (ablated - plain).abs().max() > 1e-3
    # Position 0 only ever attends to itself, so a uniform causal pattern cannot change it.
    torch.testing.assert_close(ablated[:, 0], plain[:, 0], rtol=0, atol=1e-5)
