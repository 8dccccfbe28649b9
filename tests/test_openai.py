"""The official `openai` client, unchanged, against a live server on 127.0.0.1."""

from __future__ import annotations

import copy

import pytest
from openai import OpenAI

from pocketlm.infer.config import StatsRequest
from pocketlm.infer.generate import generate
from pocketlm.infer.sampling import GenConfig
from pocketlm.serve.app import create_app
from pocketlm.tokenizer.chat_template import format_chat_tokens

MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What is a river?"}]


@pytest.fixture(scope="module")
def client(server_url) -> OpenAI:
    return OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_non_streaming_matches_direct_generation(client, tiny_model):
    model, tok = tiny_model
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                                       logprobs=True, top_logprobs=3)
    steps = list(generate(model, tok, format_chat_tokens(tok, MESSAGES), GenConfig(max_new_tokens=16, temperature=0),
                          stats=StatsRequest(top_alternatives=3)))
    shown = [s for s in steps if s.id != tok.eot_id]
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(s.text for s in shown)
    assert choice.finish_reason == ("stop" if steps[-1].id == tok.eot_id else "length")
    assert r.usage.prompt_tokens == len(format_chat_tokens(tok, MESSAGES))
    assert r.usage.completion_tokens == len(steps)
    content = choice.logprobs.content
    assert [c.logprob for c in content] == pytest.approx([s.stats.logprob for s in shown], abs=1e-5)
    assert [bytes(c.bytes) for c in content] == [s.bytes for s in shown]
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0.8, seed=11)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_eot_gives_finish_reason_stop_and_no_eot_text(tiny_model, forced_tokens, live_server):
    model, tok = tiny_model
    forced = copy.deepcopy(model)
    with forced_tokens(forced, tok.encode(" Yes.") + [tok.eot_id]), live_server(create_app(forced, tok)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="pocketlm", messages=MESSAGES, max_tokens=50, logprobs=True)
        stream = list(client.chat.completions.create(model="pocketlm", messages=MESSAGES, max_tokens=50, stream=True))
    assert r.choices[0].message.content == " Yes."
    assert r.choices[0].finish_reason == "stop"
    assert "<|eot|>" not in "".join(c.token for c in r.choices[0].logprobs.content)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == " Yes."
    assert stream[-1].choices[0].finish_reason == "stop"


def test_client_sees_bad_request_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
