"""Repeat, frequency and presence penalties: each changes the next-token distribution exactly as
specified (checked against the formulas applied by hand to a plain forward's logits), neutral values
give exactly today's output, and the API, the inspector and the `generate` / `chat` commands apply them.

The formulas: llama.cpp's repeat penalty (`llama_sampler_penalties_apply`, src/llama-sampling.cpp):
for each distinct token among the last N (the prompt included), logit / penalty when the logit is
positive, logit * penalty otherwise. OpenAI's frequency / presence penalties: logit[j] -= c[j] * f +
(c[j] > 0) * p, c[j] counting the tokens sampled in the reply so far (not the prompt).
"""

from __future__ import annotations

import io
import math
import os
import re

import httpx
import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.cli import main
from pocketlm.infer.chat import ChatSession
from pocketlm.infer.config import StatsRequest
from pocketlm.infer.generate import PENALTIES_EAGER, generate
from pocketlm.infer.sampling import GenConfig, Penalties, make_generator, sample_next
from pocketlm.tokenizer.chat_template import format_chat_tokens

MESSAGES = [{"role": "user", "content": "Tell me about rivers and rivers and rivers."}]
ON = dict(repeat_penalty=1.4, repeat_last_n=12, frequency_penalty=0.7, presence_penalty=0.4)


def by_hand(logits: list[float], prompt: list[int], sampled: list[int], cfg: GenConfig, context: int) -> list[float]:
    """The penalties written out plainly, one token at a time, in Python floats."""
    out = list(logits)
    n = context if cfg.repeat_last_n == -1 else cfg.repeat_last_n
    window = set((prompt + sampled)[-n:]) if n > 0 and cfg.repeat_penalty != 1.0 else set()
    for j in range(len(out)):
        if j in window:
            out[j] = out[j] / cfg.repeat_penalty if out[j] > 0 else out[j] * cfg.repeat_penalty
        c = sampled.count(j)
        out[j] -= c * cfg.frequency_penalty + (1.0 if c > 0 else 0.0) * cfg.presence_penalty
    return out


@pytest.mark.parametrize("over", [
    dict(repeat_penalty=1.5, repeat_last_n=4),  # a window shorter than the prompt
    dict(repeat_penalty=0.7, repeat_last_n=40),  # longer than prompt + reply: unfilled slots count nothing
    dict(repeat_penalty=2.0, repeat_last_n=-1),  # the whole context
    dict(repeat_penalty=1.2, repeat_last_n=10**6),  # longer than the context: the whole of it
    dict(frequency_penalty=1.25),
    dict(presence_penalty=-0.5),
    ON,
])
def test_penalties_follow_the_formulas_step_by_step(over):
    V, context = 50, 64
    cfg = GenConfig(**over)
    gen = torch.Generator().manual_seed(0)
    prompt = [3, 7, 7, 11, 20, 3]
    pen = Penalties(cfg, prompt, V, context, torch.device("cpu"))
    sampled: list[int] = []
    for step, chosen in enumerate([7, 30, 30, 49, 0, 30, 3, 12, 12, 12]):
        logits = torch.randn(V, generator=gen) * 3
        logits[[0, 3, 7, 30]] = torch.tensor([0.0, -2.0, 2.5, 1.0])  # both signs, and zero, among the seen ids
        got = pen.apply(logits)
        want = by_hand(logits.tolist(), prompt, sampled, cfg, context)
        assert got.tolist() == pytest.approx(want, rel=1e-6, abs=1e-6), f"step {step}"
        pen.update(torch.tensor(chosen))
        sampled.append(chosen)
    assert sampled.count(30) == 3 and pen.counts[30].item() == 3.0


def test_neutral_values_leave_the_logits_bit_identical():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 4
    neutral = GenConfig(repeat_penalty=1.0, repeat_last_n=8, frequency_penalty=0.0, presence_penalty=0.0)
    assert not neutral.penalized and not GenConfig(repeat_penalty=1.3, repeat_last_n=0).penalized
    # Even when forced through the arithmetic, x / 1, x * 1 and x - 0 are exact.
    forced = Penalties(GenConfig(repeat_penalty=1.3, repeat_last_n=8), [1, 2, 3], 64, 64, torch.device("cpu"))
    forced.cfg = neutral
    forced.update(torch.tensor(5))
    assert torch.equal(forced.apply(logits), logits)


def run(model, tok, cfg, stats=StatsRequest(top_alternatives=3), prompt=None):
    gen = generate(model, tok, prompt or format_chat_tokens(tok, MESSAGES), cfg, stats=stats)
    return gen, list(gen)


def plain_logits(model, ids: list[int], vocab: int) -> torch.Tensor:
    """Next-token logits of a plain forward over the whole sequence (no cache, no penalties)."""
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]))
    return logits[0, -1, :vocab].float()


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_each_step_matches_a_direct_computation_on_the_models_logits(tiny_model, mode):
    model, tok = tiny_model
    sampling = dict(temperature=0.0) if mode == "greedy" else dict(temperature=0.9, top_p=0.95, seed=5)
    cfg = GenConfig(max_new_tokens=40, **sampling, **ON)
    prompt = format_chat_tokens(tok, MESSAGES)
    _, steps = run(model, tok, cfg)
    _, plain = run(model, tok, GenConfig(max_new_tokens=40, **sampling))
    ids = [s.id for s in steps]
    assert ids != [s.id for s in plain]  # the penalties changed the reply
    rng = make_generator(cfg.seed, torch.device("cpu"))
    moved = 0
    for k, step in enumerate(steps):
        raw = plain_logits(model, prompt + ids[:k], tok.vocab_size)
        want = torch.tensor(by_hand(raw.tolist(), prompt, ids[:k], cfg, model.cfg.block_size))
        # The model's own logprob, and the one after the penalties, of the token chosen.
        assert step.stats.logprob == pytest.approx(torch.log_softmax(raw, -1)[step.id].item(), abs=1e-4)
        assert step.stats.penalized_logprob == pytest.approx(torch.log_softmax(want, -1)[step.id].item(), abs=1e-4)
        moved += abs(step.stats.penalized_logprob - step.stats.logprob) > 1e-3
        if mode == "greedy":
            assert step.id == int(torch.argmax(want))
        else:  # the same draw from the same generator over the hand-penalized distribution
            assert step.id == int(sample_next(want, cfg, rng))
    assert moved >= len(steps) // 2


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=50, seed=9)])
def test_neutral_penalties_give_exactly_todays_output(tiny_model, sampling):
    model, tok = tiny_model
    today = run(model, tok, GenConfig(max_new_tokens=30, **sampling))[1]
    for neutral in (dict(repeat_penalty=1.0, repeat_last_n=-1, frequency_penalty=0.0, presence_penalty=0.0),
                    dict(repeat_penalty=1.8, repeat_last_n=0)):  # a window of 0 turns the repeat penalty off
        gen, steps = run(model, tok, GenConfig(max_new_tokens=30, **sampling, **neutral))
        assert [s.id for s in steps] == [s.id for s in today]
        assert [(s.stats.logprob, s.stats.entropy, s.stats.top) for s in steps] == \
               [(s.stats.logprob, s.stats.entropy, s.stats.top) for s in today]
        assert all(s.stats.penalized_logprob is None for s in steps) and gen.path == "eager"
    if sampling["temperature"] == 0.0:  # and today's greedy output is the argmax of plain forwards
        prompt = format_chat_tokens(tok, MESSAGES)
        ids = [s.id for s in today]
        assert ids == [int(torch.argmax(plain_logits(model, prompt + ids[:k], tok.vocab_size)))
                       for k in range(len(ids))]


def test_penalties_are_checked(tiny_model):
    model, tok = tiny_model
    for bad, msg in ((dict(frequency_penalty=2.5), "frequency_penalty must be in"),
                     (dict(presence_penalty=-2.01), "presence_penalty must be in"),
                     (dict(presence_penalty=math.nan), "presence_penalty must be in"),
                     (dict(repeat_penalty=0.0), "repeat_penalty must be in"),
                     (dict(repeat_last_n=-2), "repeat_last_n must be")):
        with pytest.raises(PocketLMError, match=msg):
            generate(model, tok, [1, 2, 3], GenConfig(**bad))


def test_penalized_requests_take_the_eager_path_and_say_why(tiny_model):
    model, tok = tiny_model
    gen, _ = run(model, tok, GenConfig(max_new_tokens=4, temperature=0.0, presence_penalty=0.5), stats=None)
    assert gen.path == "eager"  # off CUDA nothing asks for the graph path
    forced = generate(model, tok, [1, 2, 3], GenConfig(max_new_tokens=4, presence_penalty=0.5), accel=True)
    list(forced)
    assert forced.path == PENALTIES_EAGER


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the graph path needs CUDA")
def test_on_cuda_penalized_requests_decode_eagerly_as_on_the_eager_path(tiny_model):
    model, tok = tiny_model
    cuda = model.to("cuda")
    try:
        cfg = GenConfig(max_new_tokens=24, temperature=0.0, **ON)
        a = generate(cuda, tok, [5, 6, 7, 5, 6, 7], cfg, accel=True)
        b = generate(cuda, tok, [5, 6, 7, 5, 6, 7], cfg, accel=False)
        assert [s.id for s in a] == [s.id for s in b] and a.path == PENALTIES_EAGER
    finally:
        model.to("cpu")


def test_penalties_under_mps_rules(tiny_model, mps_rules):
    model, tok = tiny_model
    for sampling in (dict(temperature=0.0), dict(temperature=0.8, top_p=0.95, seed=2)):
        _, steps = run(model, tok, GenConfig(max_new_tokens=16, **sampling, **ON))
        assert len(steps) >= 1 and all(s.stats.penalized_logprob is not None for s in steps)


# --- the OpenAI API and the inspector --------------------------------------------------------------------

def chat(url: str, **kw) -> httpx.Response:
    body = {"messages": MESSAGES, "max_tokens": 24, "temperature": 0, "logprobs": True, **kw}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_api_applies_frequency_and_presence_penalties(server_url, tiny_model):
    model, tok = tiny_model
    cfg = GenConfig(max_new_tokens=24, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5)
    want = [s for s in run(model, tok, cfg, stats=None)[1] if s.id != tok.eot_id]
    r = chat(server_url, frequency_penalty=1.5, presence_penalty=0.5)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "".join(s.text for s in want)
    plain = chat(server_url).json()["choices"][0]["message"]["content"]
    for neutral in (0, None):  # null, as some clients send for "not set", is 0
        again = chat(server_url, frequency_penalty=neutral, presence_penalty=neutral)
        assert again.json()["choices"][0]["message"]["content"] == plain
    assert plain != r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("field,value", [("frequency_penalty", 2.5), ("presence_penalty", -3),
                                         ("frequency_penalty", "x")])
def test_api_refuses_out_of_range_penalties(server_url, field, value):
    r = chat(server_url, **{field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_inspector_events_carry_the_logprob_before_and_after_the_penalties(server_url, tiny_model, inspect):
    model, tok = tiny_model
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "top_alternatives": 2}
    plain = [d for e, d in inspect(server_url, body) if e == "token"]
    assert all("penalized_logprob" not in d for d in plain)
    events = [d for e, d in inspect(server_url, {**body, "repeat_penalty": 1.4, "repeat_last_n": 12,
                                                 "frequency_penalty": 0.7, "presence_penalty": 0.4}) if e == "token"]
    steps = run(model, tok, GenConfig(max_new_tokens=12, temperature=0.0, **ON), StatsRequest(top_alternatives=2))[1]
    assert [d["id"] for d in events] == [s.id for s in steps]
    for d, s in zip(events, steps):
        assert d["logprob"] == pytest.approx(s.stats.logprob) and d["penalized_logprob"] == pytest.approx(
            s.stats.penalized_logprob)
    r = httpx.post(f"{server_url}/api/inspect", json={**body, "repeat_penalty": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "repeat_penalty"


# --- the commands -----------------------------------------------------------------------------------------

def test_generate_command_takes_the_repeat_penalty(tiny_ckpt, tiny_model, capsys):
    model, tok = tiny_model
    args = ["generate", "--ckpt", str(tiny_ckpt), "--prompt", "The river and the river", "--max-new-tokens", "20",
            "--temperature", "0", "--device", "cpu"]
    assert main(args + ["--repeat-penalty", "1.5", "--repeat-last-n", "16"]) == 0
    penalized = capsys.readouterr().out
    cfg = GenConfig(max_new_tokens=20, temperature=0.0, repeat_penalty=1.5, repeat_last_n=16)
    steps = run(model, tok, cfg, stats=None, prompt=tok.encode("The river and the river"))[1]
    assert penalized == "".join(s.text for s in steps) + "\n"
    assert main(args) == 0
    assert capsys.readouterr().out != penalized
    assert main(args + ["--repeat-penalty", "-1"]) == 1
    assert "repeat_penalty must be in" in capsys.readouterr().err


def test_chat_command_takes_the_repeat_penalty(tiny_ckpt, tiny_model, capsys, monkeypatch):
    model, tok = tiny_model
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me about rivers.\n"))
    assert main(["chat", "--ckpt", str(tiny_ckpt), "--max-new-tokens", "16", "--temperature", "0",
                 "--repeat-penalty", "1.6", "--repeat-last-n", "-1", "--device", "cpu"]) == 0
    reply = capsys.readouterr().out.split("model> ", 1)[1].split("\nyou> ")[0]
    cfg = GenConfig(max_new_tokens=16, temperature=0.0, repeat_penalty=1.6, repeat_last_n=-1)
    assert reply == "".join(ChatSession(model, tok, cfg).reply("Tell me about rivers."))
    plain = GenConfig(max_new_tokens=16, temperature=0.0)
    assert reply != "".join(ChatSession(model, tok, plain).reply("Tell me about rivers."))


# --- the page ----------------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("POCKETLM_REQUIRE_BROWSER") != "1",
                    reason="needs Chromium at /usr/bin/chromium")
def test_page_shows_a_tokens_probability_before_and_after_the_penalties(server_url, inspect, tmp_path):
    """A real penalized stream, replayed in the page: hovering a token shows p before -> after."""
    import json

    from playwright.sync_api import expect, sync_playwright

    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "top_alternatives": 2, **ON}
    events = inspect(server_url, body)
    token = next(d for e, d in events if e == "token" and d["text"].strip())
    saved = tmp_path / "penalized.jsonl"
    saved.write_text("".join(json.dumps({"event": e, "data": d}) + "\n" for e, d in events))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server_url)
            page.set_input_files("#replay", str(saved))
            expect(page.locator("#status")).to_have_text(re.compile("finished"))
            page.locator(".msg.assistant .reply .tok").nth(token["index"]).hover()
            after = math.exp(token["penalized_logprob"])
            expect(page.locator("#tooltip .tt-penalty")).to_have_text(
                f"penalties: p={token['prob']:.3f} → {after:.3f} "
                f"(logprob {token['logprob']:.2f} → {token['penalized_logprob']:.2f})")
            assert errors == []
        finally:
            browser.close()
