"""The accelerated (CUDA-only) paths against the eager ones: decoding through a captured CUDA graph,
and the compiled training step (with and without flex attention). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from pocketlm.infer.op_count import IdTokens as Tok  # eot_id -1: a random model never stops early
from pocketlm.infer.config import StatsRequest
from pocketlm.infer.generate import generate
from pocketlm.infer.sampling import GenConfig
from pocketlm.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and flex attention need CUDA")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=512, n_layer=3)).cuda().eval()


def run(model, prompt, cfg, **kw):
    gen = generate(model, Tok(512), prompt, cfg, **kw)
    return gen, list(gen)


def test_graph_greedy_equals_eager_with_statistics(model):
    prompt = list(range(5, 25))
    cfg = GenConfig(max_new_tokens=48, temperature=0.0)
    eager_gen, eager = run(model, prompt, cfg, stats=StatsRequest(), accel=False)
    graph_gen, graph = run(model, prompt, cfg, stats=StatsRequest(), accel=True)
    assert (eager_gen.path, graph_gen.path) == ("eager", "graph")
    assert [s.id for s in graph] == [s.id for s in eager]
    assert [s.cache_len for s in graph] == [s.cache_len for s in eager]
    for g, e in zip(graph, eager):
        assert g.stats.logprob == pytest.approx(e.stats.logprob, abs=1e-3)
        assert g.stats.entropy == pytest.approx(e.stats.entropy, abs=1e-3)
        assert [i for i, _ in g.stats.top[:2]] == [i for i, _ in e.stats.top[:2]]
    _, bare = run(model, prompt, cfg, accel=True)  # no statistics: another graph, the same tokens
    assert [s.id for s in bare] == [s.id for s in eager] and all(s.stats is None for s in bare)


def test_graph_sampling_is_seeded_and_interleaved_generations_keep_their_caches(model):
    cfg = GenConfig(max_new_tokens=30, temperature=0.9, top_k=40, seed=3)
    _, alone = run(model, [7, 8, 9], cfg, accel=True)
    _, again = run(model, [7, 8, 9], cfg, accel=True)
    assert [s.id for s in alone] == [s.id for s in again]
    # Two generations stepped in turn (as the server does) each get their own slot and cache.
    a = generate(model, Tok(512), [7, 8, 9], cfg, accel=True)
    b = generate(model, Tok(512), [11, 12], GenConfig(max_new_tokens=30, temperature=0.0), accel=True)
    ids_a, ids_b = [], []
    for sa, sb in zip(a, b):
        ids_a.append(sa.id)
        ids_b.append(sb.id)
    _, greedy_b = run(model, [11, 12], GenConfig(max_new_tokens=30, temperature=0.0), accel=False)
    assert ids_a == [s.id for s in alone] and ids_b == [s.id for s in greedy_b]


def test_hooks_keep_the_eager_path_and_say_so(model):
    gen, _ = run(model, [5, 6], GenConfig(max_new_tokens=3, temperature=0.0), stats=StatsRequest(logit_lens=True),
                 accel=True)
    assert gen.path.startswith("eager (") and "hooks" in gen.path


@pytest.mark.parametrize("flex", [False, True])
def test_compiled_training_step_matches_eager(flex):
    """The compiled forward + backward (the accelerated training path; with flex attention, its
    not-yet-default variant) gives the eager gradients."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=512)).cuda()
    with torch.no_grad():  # logits far from uniform, so attention errors show in the loss
        model.embed.weight.mul_(50)
    B, T = 2, 128
    x, y = torch.randint(0, 512, (B, T), device="cuda"), torch.randint(0, 512, (B, T), device="cuda")
    doc_ids = (torch.arange(T, device="cuda") // 40).expand(B, T).contiguous()
    positions = (torch.arange(T, device="cuda") % 40).expand(B, T).contiguous()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, want = model(x, y, positions=positions, doc_ids=doc_ids)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.use_flex_attention(flex)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, got = torch.compile(model)(x, y, positions=positions, doc_ids=doc_ids, return_logits=False)
    got.backward()
    model.use_flex_attention(False)
    assert float(got) == pytest.approx(float(want), rel=1e-2)
    for p, g in zip(model.parameters(), want_grads):
        assert float((p.grad - g).norm() / g.norm()) < 5e-2
