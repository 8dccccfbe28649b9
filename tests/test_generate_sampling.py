"""The pure sampling functions, on hand-made logits with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.infer.config import StatsRequest
from pocketlm.infer.sampling import GenConfig, filtered_logits, make_generator, sample_next
from pocketlm.infer.stats import StatsLayout, token_stats, topk_blocked

LOGITS = torch.tensor([1.0, 2.0, 3.0, 4.0])  # softmax ≈ [0.032, 0.087, 0.237, 0.644]
NEG = float("-inf")


def test_greedy_is_argmax():
    assert int(sample_next(LOGITS, GenConfig(temperature=0.0), None)) == 3


def test_top_k_keeps_the_k_largest():
    assert filtered_logits(LOGITS, GenConfig(temperature=1.0, top_k=2)).tolist() == [NEG, NEG, 3.0, 4.0]


@pytest.mark.parametrize("top_p, kept", [(0.5, [3]), (0.7, [2, 3]), (0.9, [1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    out = filtered_logits(LOGITS, GenConfig(temperature=1.0, top_p=top_p))
    assert [i for i, v in enumerate(out.tolist()) if v != NEG] == kept


def test_temperature_scales_logits():
    assert filtered_logits(LOGITS, GenConfig(temperature=0.5)).tolist() == [2.0, 4.0, 6.0, 8.0]


def test_seeded_sampling_matches_the_distribution():
    cfg = GenConfig(temperature=1.0)
    g = make_generator(0, torch.device("cpu"))
    counts = torch.bincount(torch.stack([sample_next(LOGITS, cfg, g) for _ in range(4000)]), minlength=4)
    assert (counts / 4000).tolist() == pytest.approx(torch.softmax(LOGITS, 0).tolist(), abs=0.03)
    g1, g2 = make_generator(5, torch.device("cpu")), make_generator(5, torch.device("cpu"))
    assert [int(sample_next(LOGITS, cfg, g1)) for _ in range(20)] == [int(sample_next(LOGITS, cfg, g2)) for _ in range(20)]


def test_token_stats_values():
    layout = StatsLayout(StatsRequest(top_alternatives=2), n_layer=2, n_head=2)
    tid, stats = layout.unpack(layout.pack(LOGITS, torch.tensor(2)).tolist())
    logp = torch.log_softmax(LOGITS, 0)
    entropy = -float((logp.exp() * logp).sum())
    assert tid == 2
    assert stats.logprob == pytest.approx(float(logp[2]))
    assert stats.entropy == pytest.approx(entropy)
    assert [i for i, _ in stats.top] == [3, 2]
    assert [lp for _, lp in stats.top] == pytest.approx([float(logp[3]), float(logp[2])])
    assert stats.lens is None and stats.attn_entropy is None
    uniform = token_stats(torch.zeros(1000), torch.tensor(0), k=0).tolist()
    assert uniform[1] == pytest.approx(math.log(1000), rel=1e-6)


def test_no_stats_request_sends_only_the_id():
    layout = StatsLayout(None, n_layer=2, n_head=2)
    packed = layout.pack(LOGITS, torch.tensor(1))
    assert packed.tolist() == [1.0] and layout.unpack(packed.tolist()) == (1, None)


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_k", -2),
                                          ("top_p", 0.0), ("top_p", 1.5)])
def test_validate_names_the_field(field, value):
    with pytest.raises(PocketLMError, match=field):
        GenConfig(**{field: value}).validate()


@pytest.mark.parametrize(("shape", "k"), [((16000,), 5), ((8, 16000), 3), ((16001,), 7), ((300,), 5), ((5,), 5)])
def test_blocked_top_k_equals_torch_topk(shape, k):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(k))
    values, ids = topk_blocked(x, k)
    want = torch.topk(x, k)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)
