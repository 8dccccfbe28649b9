"""KVCache: prefill + decode and chunked prefill reproduce the uncached forward at every step."""

from __future__ import annotations

import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.model.kv_cache import KVCache
from pocketlm.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=256)).eval()


@pytest.mark.parametrize("prompt_len", [1, 3, 8])
def test_prefill_then_decode_matches_uncached(model: GPT, prompt_len: int):
    torch.manual_seed(prompt_len)
    seq = torch.randint(0, 256, (2, prompt_len + 6))
    full, _ = model(seq)
    cache = KVCache(model.cfg, 2, seq.shape[1], "cpu", torch.float32)
    logits, _ = model(seq[:, :prompt_len], cache=cache)
    torch.testing.assert_close(logits, full[:, :prompt_len], rtol=0, atol=1e-5)
    assert cache.pos == prompt_len
    for t in range(prompt_len, seq.shape[1]):
        step, _ = model(seq[:, t:t + 1], cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5)
    assert cache.pos == seq.shape[1]


def test_chunked_prefill_after_cache_matches_uncached(model: GPT):
    torch.manual_seed(3)
    seq = torch.randint(0, 256, (1, 16))
    full, _ = model(seq)
    cache = KVCache(model.cfg, 1, 16, "cpu", torch.float32)
    pieces = [(0, 5), (5, 9), (9, 10), (10, 16)]  # prefill, a chunk, one decode step, another chunk
    for a, b in pieces:
        logits, _ = model(seq[:, a:b], cache=cache)
        torch.testing.assert_close(logits, full[:, a:b], rtol=0, atol=1e-5)


def test_reset_reuses_the_storage(model: GPT):
    seq = torch.randint(0, 256, (1, 6))
    cache = KVCache(model.cfg, 1, 6, "cpu", torch.float32)
    first, _ = model(seq, cache=cache)
    cache.reset()
    assert cache.pos == 0
    again, _ = model(seq, cache=cache)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_update_writes_at_pos_and_returns_views():
    cfg = GPTConfig.tiny(vocab_size=256)  # 2 layers, 4 heads, head_dim 16
    cache = KVCache(cfg, 2, 10, "cpu", torch.float32)
    assert cache.nbytes == 2 * 2 * 2 * 4 * 10 * 16 * 4  # k and v, L, B, H, max_len, D, fp32
    k1, v1 = torch.randn(2, 2, 4, 3, 16)
    k_all, v_all = cache.update(1, k1, v1)
    assert k_all.shape == (2, 4, 3, 16) and torch.equal(k_all, k1) and torch.equal(v_all, v1)
    cache.advance(3)
    k2, v2 = torch.randn(2, 2, 4, 1, 16)
    k_all, _ = cache.update(1, k2, v2)
    assert torch.equal(k_all, torch.cat([k1, k2], dim=2))
    assert k_all.data_ptr() == cache.k[1].data_ptr()  # a view, not a copy
    assert torch.count_nonzero(cache.k[0]) == 0  # the other layer is untouched


def test_overflow_raises_a_clear_error(model: GPT):
    cache = KVCache(model.cfg, 1, 4, "cpu", torch.float32)
    model(torch.randint(0, 256, (1, 3)), cache=cache)
    with pytest.raises(PocketLMError, match="KV cache full: 3 cached \\+ 2 new > max_len 4"):
        model(torch.randint(0, 256, (1, 2)), cache=cache)


def test_doc_ids_with_cache_are_refused(model: GPT):
    cache = KVCache(model.cfg, 1, 4, "cpu", torch.float32)
    with pytest.raises(PocketLMError, match="doc_ids"):
        model(torch.zeros(1, 2, dtype=torch.long), doc_ids=torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_static_cache_decoding_matches_the_dynamic_cache(model: GPT):
    """The graph path's addressing (device-side position, all slots attended, the rest masked), run
    eagerly: the same logits as the host-addressed cache at every step."""
    torch.manual_seed(5)
    seq = torch.randint(0, 256, (1, 12))
    dynamic = KVCache(model.cfg, 1, 12, "cpu", torch.float32)
    static = KVCache(model.cfg, 1, model.cfg.block_size, "cpu", torch.float32)
    model(seq[:, :4], cache=dynamic)
    model(seq[:, :4], cache=static)
    static.position.fill_(static.pos)
    static.static = True
    for t in range(4, 12):
        want, _ = model(seq[:, t:t + 1], cache=dynamic)
        got, _ = model(seq[:, t:t + 1], cache=static)
        static.position.add_(1)  # what the graph does; the host count is its owner's job
        static.pos += 1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert int(static.position) == static.pos == 12
    with pytest.raises(PocketLMError, match="one token per forward"):
        model(seq[:, :2], cache=static)


def test_compiled_static_step_writes_one_layer_at_a_time(model: GPT):
    """The static step as torch.compile sees it after functionalization: every cache write may produce at
    most one layer's K or V, never a new copy of every layer's cache (which made the compiled CPU decode
    4-5x slower than eager: docs/LOG.md). Its logits still match the eager static step."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from pocketlm.infer.graph_decode import _forward_one

    sizes: list[int] = []  # elements of every tensor the step computes that holds cache slots
    slots = (model.cfg.block_size, model.cfg.head_dim)

    def record(gm: torch.fx.GraphModule, _inputs):
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            if node.op == "call_function" and isinstance(val, torch.Tensor) and tuple(val.shape[-2:]) == slots:
                sizes.append(val.numel())
        return make_boxed_func(gm.forward)

    torch.manual_seed(5)
    seq = torch.randint(0, 256, (1, 6))
    caches = []
    for _ in range(2):
        cache = KVCache(model.cfg, 1, model.cfg.block_size, "cpu", torch.float32)
        model(seq[:, :5], cache=cache)
        cache.position.fill_(cache.pos)
        cache.static = True
        caches.append(cache)
    step = torch.compile(_forward_one, backend=aot_autograd(fw_compiler=record), dynamic=False)
    with torch.inference_mode():
        got = step(model, seq[:, 5:], caches[0])
        want = _forward_one(model, seq[:, 5:], caches[1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(caches[0].k[0], caches[1].k[0], rtol=0, atol=0)
    per_layer = caches[0].k[0].numel()
    assert sizes and max(sizes) <= per_layer, (max(sizes), per_layer)
