"""Generation: KV cache vs full recompute, stopping, cancellation, UTF-8 streaming, inspector signals."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.infer.detok import StreamDecoder
from pocketlm.infer.config import StatsRequest
from pocketlm.infer.generate import generate
from pocketlm.infer.sampling import GenConfig

PROMPT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
          "nothing to do: once or twice she had peeped into the book her sister was reading")


def uncached_greedy(model, prompt: list[int], n: int, eot: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by re-running the whole sequence every step (no cache): the reference."""
    ids, logprobs = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            logp = torch.log_softmax(logits[0, -1], dim=-1)
            nxt = int(torch.argmax(logp))
            ids.append(nxt)
            logprobs.append(float(logp[nxt]))
            if nxt == eot:
                break
    return ids[len(prompt):], logprobs


@pytest.fixture(scope="module")
def endless_model(tiny_model, suppress_eot):
    """The tiny model with <|eot|> suppressed, so every run compares the full 64 tokens."""
    model, tok = tiny_model
    endless = copy.deepcopy(model)
    suppress_eot(endless, tok.eot_id)
    return endless, tok


@pytest.mark.parametrize("n_prompt", [1, 7, 30, 50])
def test_cached_greedy_equals_uncached(endless_model, n_prompt):
    model, tok = endless_model
    prompt = tok.encode(PROMPT)[:n_prompt]
    assert len(prompt) == n_prompt
    steps = list(generate(model, tok, prompt, GenConfig(max_new_tokens=64, temperature=0.0), stats=StatsRequest()))
    ref_ids, ref_logprobs = uncached_greedy(model, prompt, 64, tok.eot_id)
    assert [s.id for s in steps] == ref_ids
    assert len(ref_ids) == 64
    assert [s.stats.logprob for s in steps] == pytest.approx(ref_logprobs, abs=1e-4)
    assert [s.cache_len for s in steps] == list(range(n_prompt, n_prompt + 64))


def test_eot_stops_at_once_and_never_shows(tiny_model, forced_tokens):
    model, tok = tiny_model
    with forced_tokens(model, [tok.eot_id]):
        gen = generate(model, tok, tok.encode("Hello"), GenConfig(max_new_tokens=50, temperature=1.0, seed=0))
        steps = list(gen)
    assert [s.id for s in steps] == [tok.eot_id]
    assert gen.finish_reason == "eot"
    assert steps[0].text == "" and steps[0].bytes == b""


def test_stops_on_eot_after_forced_text(tiny_model, forced_tokens):
    model, tok = tiny_model
    word = tok.encode(" cats and dogs")
    with forced_tokens(model, word + [tok.eot_id]):
        gen = generate(model, tok, tok.encode("I like"), GenConfig(max_new_tokens=50, temperature=0.7, seed=3))
        text = "".join(s.text for s in gen)
    assert text == " cats and dogs"
    assert gen.finish_reason == "eot" and gen.n_tokens == len(word) + 1


def test_split_utf8_arrives_as_bytes_never_replacement(tiny_model, forced_tokens):
    model, tok = tiny_model
    s = "née 🙂 世界 ok"
    ids = tok.encode(s)
    assert any(not _decodes(tok.id_to_bytes(i)) for i in ids)  # the emoji/CJK really are split
    with forced_tokens(model, ids + [tok.eot_id]):
        steps = list(generate(model, tok, tok.encode("Say"), GenConfig(max_new_tokens=40, temperature=0.0)))
    assert b"".join(st.bytes for st in steps) == s.encode("utf-8")
    assert "".join(st.text for st in steps) == s
    assert all("\ufffd" not in st.text for st in steps)
    assert any(st.text == "" and st.bytes for st in steps)  # held back while a character was incomplete


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_stream_decoder_drops_stray_bytes(small_tokenizer):
    tok = small_tokenizer
    dec = StreamDecoder(tok)
    stray = tok.encode("\u01c2")[-1]  # an unseen character's last byte (0x82) cannot start a character
    assert tok.id_to_bytes(stray) == b"\x82"
    out = [dec.push(i) for i in [stray] + tok.encode("ab")]
    assert "".join(out) == "ab"


def test_length_at_max_new_tokens_and_at_context_end(tiny_model, forced_tokens):
    model, tok = tiny_model
    block = model.cfg.block_size
    prompt = (tok.encode(PROMPT) * 10)[:block - 2]
    with forced_tokens(model, [tok.encode("a")[0]]):  # never eot, so only a limit can stop it
        gen = generate(model, tok, tok.encode(PROMPT)[:5], GenConfig(max_new_tokens=3, temperature=0.0))
        assert len(list(gen)) == 3 and gen.finish_reason == "length"
        gen = generate(model, tok, prompt, GenConfig(max_new_tokens=50, temperature=0.0))
        steps = list(gen)
    # Positions block-2 .. block-1 get fed back; the token chosen with a full cache ends it.
    assert len(steps) == 3 and gen.finish_reason == "length"
    assert steps[-1].cache_len == block
    with pytest.raises(PocketLMError, match="prompt is 129 tokens"):
        generate(model, tok, [5] * (block + 1), GenConfig())


def test_cancel_stops_before_next_token(tiny_model, forced_tokens):
    model, tok = tiny_model
    cancel = threading.Event()
    seen = []

    def on_step(step):
        seen.append(step.index)
        if step.index == 3:
            cancel.set()

    gen = generate(model, tok, tok.encode(PROMPT)[:8], GenConfig(max_new_tokens=60, temperature=0.0),
                   on_step=on_step, cancel=cancel)
    with forced_tokens(model, [tok.encode("a")[0]]):
        assert [s.index for s in gen] == [0, 1, 2, 3]
    assert seen == [0, 1, 2, 3] and gen.finish_reason == "cancelled"


def test_seeded_sampling_is_reproducible(tiny_model):
    model, tok = tiny_model
    prompt = tok.encode(PROMPT)[:10]
    runs = [[s.id for s in generate(model, tok, prompt, GenConfig(max_new_tokens=20, temperature=1.0, seed=s))]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_signals_observe_without_changing_output(tiny_model):
    model, tok = tiny_model
    prompt = tok.encode(PROMPT)[:12]
    greedy = GenConfig(max_new_tokens=10, temperature=0.0)
    plain = list(generate(model, tok, prompt, greedy, stats=StatsRequest()))
    lensed = list(generate(model, tok, prompt, greedy, stats=StatsRequest(logit_lens=True)))
    # The logit lens only reads hook_resid_post: bit-identical logits.
    assert [(s.id, s.stats.logprob, s.stats.entropy) for s in plain] == \
        [(s.id, s.stats.logprob, s.stats.entropy) for s in lensed]
    L = model.cfg.n_layer
    for s in lensed:
        assert len(s.stats.lens) == L and len(s.stats.lens[0]) == 3
        top_id, top_p = s.stats.lens[-1][0]  # the last layer's lens is the model's own prediction
        assert top_id == s.id and top_p == pytest.approx(math.exp(s.stats.logprob), rel=1e-4)
    attn = list(generate(model, tok, prompt, greedy, stats=StatsRequest(attn_entropy=True)))
    # Pattern hooks switch attention to the explicit path: equal to the fused kernel to fp tolerance.
    assert [s.id for s in attn] == [s.id for s in plain]
    assert [s.stats.logprob for s in attn] == pytest.approx([s.stats.logprob for s in plain], abs=1e-4)
    for s in attn:
        assert len(s.stats.attn_entropy) == L and len(s.stats.attn_entropy[0]) == model.cfg.n_head
        assert all(-1e-5 <= e <= math.log(s.cache_len) + 1e-5 for row in s.stats.attn_entropy for e in row)
    first = model.cfg.n_head * [0.0]  # with one cached token, attention has nowhere else to go
    one = list(generate(model, tok, prompt[:1], GenConfig(max_new_tokens=1, temperature=0.0),
                        stats=StatsRequest(attn_entropy=True)))
    assert one[0].stats.attn_entropy[0] == pytest.approx(first, abs=1e-6)


def test_statistics_only_when_asked(tiny_model):
    model, tok = tiny_model
    prompt = tok.encode(PROMPT)[:6]
    bare = list(generate(model, tok, prompt, GenConfig(max_new_tokens=5, temperature=0.0)))
    asked = list(generate(model, tok, prompt, GenConfig(max_new_tokens=5, temperature=0.0), stats=StatsRequest()))
    assert all(s.stats is None for s in bare)
    assert [s.id for s in bare] == [s.id for s in asked]
    assert all(len(s.stats.top) == 5 for s in asked)


def test_top_alternatives_are_sorted_and_contain_greedy_choice(tiny_model):
    model, tok = tiny_model
    steps = list(generate(model, tok, tok.encode(PROMPT)[:9], GenConfig(max_new_tokens=5, temperature=0.0),
                          stats=StatsRequest(top_alternatives=4)))
    for s in steps:
        assert len(s.stats.top) == 4 and s.stats.top[0] == (s.id, s.stats.logprob)
        assert [lp for _, lp in s.stats.top] == sorted((lp for _, lp in s.stats.top), reverse=True)
        assert 0.0 < s.stats.entropy < math.log(tok.vocab_size)
