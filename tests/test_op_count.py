"""What a decoded token asks of the device, counted under the MPS-rules mode (pocketlm/infer/op_count.py):
from torch 2.13 a decode step copies only the new token's keys and values, not every layer's whole
K/V prefix, and it reads from the device once (twice when sampling, which draws on the host on MPS)."""

from __future__ import annotations

import pytest
import torch

from pocketlm.infer.config import StatsRequest
from pocketlm.infer.op_count import IdTokens, OpCounter, decode_op_counts
from pocketlm.model import GPT, GPTConfig, attention
from pocketlm.mps_rules import MPSRules

CFG = GPTConfig.tiny(vocab_size=512, n_layer=3)
PROMPT = list(range(5, 37))  # 32 tokens: the counted steps run at KV lengths 33..40


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def counts(model: GPT, **kw) -> dict:
    with MPSRules():
        return decode_op_counts(model, IdTokens(CFG.vocab_size), PROMPT, 8, **kw)


def test_a_decode_step_copies_only_the_new_tokens_keys_and_values(model):
    got = counts(model)
    assert got["tokens"] == 8 and got["kv_len_from"] == 33
    new_kv = 2 * CFG.n_layer * CFG.n_head * CFG.head_dim * 4  # one token's k and v per layer, fp32
    assert got["copies_per_token"] == 2 * CFG.n_layer and got["copy_bytes_per_token"] == new_kv
    assert got["host_reads_per_token"] == 1  # the step's one vector (infer/stats.py)
    assert got["ops_per_token"] == sum(got["ops"].values()) > 0


def test_before_torch_2_13_every_layer_copies_its_k_v_prefix(model, monkeypatch):
    after = counts(model)
    monkeypatch.setattr(attention, "TORCH_VERSION", (2, 12))
    before = counts(model)
    assert before["copies_per_token"] == after["copies_per_token"] + 2 * CFG.n_layer
    # the prefixes read at KV lengths 33..40 (mean 36.5), k and v, every layer, fp32
    prefix = 2 * CFG.n_layer * CFG.n_head * CFG.head_dim * 4 * 36.5
    assert before["copy_bytes_per_token"] == after["copy_bytes_per_token"] + prefix
    assert before["ops_per_token"] == after["ops_per_token"] + 2 * CFG.n_layer


def test_the_inspectors_statistics_and_host_sampling_are_counted(model):
    greedy = counts(model)
    stats = counts(model, stats=StatsRequest())
    assert stats["ops_per_token"] > greedy["ops_per_token"] and stats["host_reads_per_token"] == 1
    sampled = counts(model, temperature=1.0)
    assert sampled["host_reads_per_token"] == 2  # the probabilities to the host, then the step's vector


def test_the_counter_counts_what_it_sees():
    x = torch.rand(4, 8)
    with OpCounter() as c:
        y = (x @ x.T).softmax(-1)
        y.t().contiguous()
        y.contiguous()  # already contiguous: no copy
    assert c.ops["mm"] == 1 and c.copies == 1 and c.copy_bytes == 4 * 4 * 4
    assert c.host_reads == 0  # CPU tensors outside the MPS-rules mode are host tensors
