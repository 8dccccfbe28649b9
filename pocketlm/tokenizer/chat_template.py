"""The chat template: messages -> token ids, built from ids (never by formatting a string).

Layout: `<|sys|>…<|eot|><|usr|>…<|eot|><|asst|>…<|eot|>`, ending with a bare `<|asst|>` when a reply
is wanted. Message content is encoded as plain text, so a user typing "<|eot|>" gets text tokens,
never the control id. Which tokens take loss is the format stage's business; this module only marks
the assistant's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from pocketlm import PocketLMError
from pocketlm.tokenizer.tokenizer_sp import Tokenizer

ROLES = ("system", "user", "assistant")


def _validate(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise PocketLMError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise PocketLMError("messages is empty: pass at least one {'role', 'content'} message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PocketLMError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise PocketLMError(f"messages[{i}]: missing key '{key}'; each message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise PocketLMError(f"messages[{i}]: unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise PocketLMError(f"messages[{i}]: content must be a string, got {type(m['content']).__name__}")


def render_chat(tok: Tokenizer, messages: Sequence[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, assistant_mask): mask is 1 on assistant content tokens and on the `<|eot|>` closing each
    assistant turn, 0 elsewhere (role tokens included). With add_generation_prompt and a last message
    that is not the assistant's, `<|asst|>` (mask 0) is appended to prompt a reply."""
    _validate(messages)
    role_ids = {"system": tok.sys_id, "user": tok.usr_id, "assistant": tok.asst_id}
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        is_asst = int(m["role"] == "assistant")
        content = tok.encode(m["content"])
        ids.append(role_ids[m["role"]])
        ids.extend(content)
        ids.append(tok.eot_id)
        mask.append(0)
        mask.extend([is_asst] * len(content))
        mask.append(is_asst)
    if add_generation_prompt and messages[-1]["role"] != "assistant":
        ids.append(tok.asst_id)
        mask.append(0)
    return ids, mask


def format_chat_tokens(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """The prompt ids for generation: ends with `<|asst|>` unless the last turn is the assistant's."""
    return render_chat(tok, messages, add_generation_prompt)[0]
