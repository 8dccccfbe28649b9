"""The start-up SDPA self-check (model/attention.py) at the model's own attention shape: it agrees on
the CPU, it covers KV lengths on and off a multiple of 32 for prefill, one-query decode and short query
blocks, it is cached per shape, and a wrong SDPA makes attention fall back to the explicit path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocketlm.model import GPT, GPTConfig, attention
from pocketlm.model.kv_cache import KVCache

CPU = torch.device("cpu")
V1 = GPTConfig.v1()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_self_check_agrees_on_the_cpu_at_v1s_shape(dtype):
    assert (V1.head_dim, V1.n_head) == (64, 8)
    cases = attention.sdpa_self_check(CPU, V1.head_dim, V1.n_head, dtype)
    assert all(c["ok"] for c in cases), [c for c in cases if not c["ok"]]
    shapes = {(c["case"], c["queries"], c["kv_len"]) for c in cases}
    for n in (31, 33, 64, 95):
        assert {("prefill", n, n), ("decode", 1, n), ("decode", 8, n)} <= shapes
    assert all(0 <= c["max_error"] <= c["tol"] for c in cases)


def test_the_check_runs_once_per_device_shape_and_dtype(monkeypatch):
    monkeypatch.setattr(attention, "_SDPA_TRUSTED", {})
    calls = []
    real = attention.sdpa_self_check
    monkeypatch.setattr(attention, "sdpa_self_check", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(3):
        assert attention.sdpa_trusted(CPU, 64, 8, torch.float32)
    assert attention.sdpa_trusted(CPU, 16, 4, torch.float32)
    assert calls == [(CPU, 64, 8, torch.float32), (CPU, 16, 4, torch.float32)]


def test_a_wrong_sdpa_for_keys_off_a_multiple_of_32_is_caught(monkeypatch):
    """A kernel wrong only at KV lengths that are not a multiple of 32 (the pytorch PR #169222 kind)."""
    real = F.scaled_dot_product_attention

    def wrong_off_32(q, k, v, **kw):
        out = real(q, k, v, **kw)
        return out + 0.1 if k.shape[-2] % 32 else out
    monkeypatch.setattr(F, "scaled_dot_product_attention", wrong_off_32)
    cases = attention.sdpa_self_check(CPU, 64, 8, torch.float32)
    assert {c["kv_len"] for c in cases if not c["ok"]} == {31, 33, 95}
    assert all(c["ok"] for c in cases if c["kv_len"] == 64)


def test_cached_decoding_falls_back_with_a_warning_when_sdpa_is_wrong(mps_rules, monkeypatch):
    """Under the MPS-rules mode (the MPS branches run): a wrong one-query SDPA at v1's head_dim makes the
    model warn and decode through the explicit path, with the logits of the correct SDPA."""
    torch.manual_seed(0)
    cfg = GPTConfig.tiny(vocab_size=300, block_size=128, n_embd=128, n_head=2)  # head_dim 64, as v1's
    model = GPT(cfg).eval()
    ids = torch.randint(0, 300, (1, 40))

    def decode() -> torch.Tensor:
        cache = KVCache(cfg, 1, 40, CPU)
        rows = []
        with torch.inference_mode():
            model(ids[:, :30], cache=cache)
            for pos in range(30, 40):  # KV lengths 31..40
                rows.append(model(ids[:, pos:pos + 1], cache=cache)[0][0, -1])
        return torch.stack(rows)
    monkeypatch.setattr(attention, "_SDPA_TRUSTED", {})
    expected = decode()
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention, "_SDPA_TRUSTED", {})
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: real(q, k, v, **kw) + (0.05 if q.shape[-2] == 1 else 0.0))
    with pytest.warns(UserWarning, match=r"head_dim 64, 2 heads.*decode q=1 kv=31.*explicit path"):
        got = decode()
    assert attention._SDPA_TRUSTED == {("cpu", 64, 2, torch.float32): False}
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
