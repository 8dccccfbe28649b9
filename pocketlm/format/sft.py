"""Chat fine-tuning format: a conversation -> token ids + per-token loss labels.

The layout `<|sys|>…<|eot|><|usr|>…<|eot|><|asst|>…<|eot|>` comes from
`pocketlm.tokenizer.chat_template.render_chat`; this module only decides which tokens take loss.
Labels are aligned with the ids (label i belongs to token i, not shifted): the batcher shifts.
"""

from __future__ import annotations

from typing import Literal, Sequence

from pocketlm import PocketLMError
from pocketlm.format import IGNORE_INDEX
from pocketlm.tokenizer.chat_template import render_chat
from pocketlm.tokenizer.tokenizer_sp import Tokenizer

MaskMode = Literal["assistant", "all"]
MASK_MODES: tuple[str, ...] = ("assistant", "all")


def has_assistant_turn(messages: Sequence[dict]) -> bool:
    return any(m.get("role") == "assistant" for m in messages)


def encode_chat(tok: Tokenizer, messages: Sequence[dict], mask: MaskMode = "assistant") -> tuple[list[int], list[int]]:
    """(ids, labels) for one chat.

    mask="assistant": only assistant content and the `<|eot|>` closing each assistant turn get loss,
    so the model learns to answer and to stop; system and user tokens get IGNORE_INDEX.
    mask="all": every token gets loss.
    """
    if mask not in MASK_MODES:
        raise PocketLMError(f"sft mask {mask!r} is not one of {', '.join(MASK_MODES)}; pick one of those")
    if not has_assistant_turn(messages):
        raise PocketLMError("chat has no assistant turn, so nothing would be learned from it: "
                            "drop it or add an assistant message")
    ids, assistant_mask = render_chat(tok, list(messages), add_generation_prompt=False)
    if mask == "all":
        return ids, list(ids)
    return ids, [i if m else IGNORE_INDEX for i, m in zip(ids, assistant_mask)]
