"""What the export tests share: the chats they send, pocketlm's own greedy reply, and the rule that turns
a missing client into a failure in CI (which installs every client) but a skip elsewhere."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# Three chats, from plain text: the first is the 3-turn conversation (system, user, assistant, user).
CHATS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "Tell me one thing about it!"}],
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Give three tips for staying healthy, and explain why (briefly)."}],
]
REPLY_TOKENS = 24

# CI installs every client (`pip install -e '.[test,llama]'`) and sets this, so a client that is missing
# or fails to import there is a failure, not a skip.
REQUIRED = os.environ.get("POCKETLM_REQUIRE_EXPORT_CLIENTS") == "1"


def need_client(module: str, why: str) -> ModuleType:
    """Import a client, or skip with a precise reason (fail when REQUIRED)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # an import that fails for any reason (missing, broken build) is reported
        message = f"{module} cannot be imported ({type(e).__name__}: {e}); {why}"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)


def pocketlm_reply(model, tok, messages: list[dict], n: int = REPLY_TOKENS) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy reply ids) as pocketlm makes them; the reply ends with <|eot|> if it stops."""
    from pocketlm.infer.generate import generate
    from pocketlm.infer.sampling import GenConfig
    from pocketlm.tokenizer.chat_template import format_chat_tokens

    prompt = format_chat_tokens(tok, messages)
    return prompt, [s.id for s in generate(model, tok, prompt, GenConfig(max_new_tokens=n, temperature=0.0))]
