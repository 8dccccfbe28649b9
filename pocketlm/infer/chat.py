"""A multi-turn chat session: the message history, its commands, and fitting it into the context.

Knows nothing about terminals or HTTP: `pocketlm chat` drives it from stdin, and tests drive it
directly. The history is kept as messages and re-rendered through the chat template each turn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from pocketlm import PocketLMError
from pocketlm.infer.generate import generate
from pocketlm.infer.sampling import GenConfig
from pocketlm.tokenizer.chat_template import format_chat_tokens

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /help"


class ChatSession:
    def __init__(self, model: torch.nn.Module, tok, cfg: GenConfig, system: str | None = None) -> None:
        self.model, self.tok, self.cfg = model, tok, cfg
        self.system = system
        self.turns: list[dict[str, str]] = []  # user/assistant messages, oldest first
        self.last_finish: str | None = None

    def command(self, line: str) -> str | None:
        """Handle a `/command` line and return what to tell the user; None if `line` is not a command."""
        if not line.startswith("/"):
            return None
        name, _, arg = line.partition(" ")
        if name == "/reset":
            self.turns.clear()
            return "conversation reset"
        if name == "/system":
            self.system = arg.strip() or None
            self.turns.clear()
            return f"system prompt {'set' if self.system else 'cleared'}; conversation reset"
        if name == "/help":
            return HELP
        return f"unknown command {name}; {HELP}"

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt_ids(self) -> list[int]:
        """The rendered history, dropping the oldest exchanges until it leaves room to answer."""
        # Room for at least a short reply; a prompt that fills the context could only end at once.
        limit = self.model.cfg.block_size - min(self.cfg.max_new_tokens, 64)
        while True:
            ids = format_chat_tokens(self.tok, self.messages(), add_generation_prompt=True)
            if len(ids) <= limit:
                return ids
            if len(self.turns) <= 1:
                self.turns.clear()
                raise PocketLMError(f"the message is {len(ids)} tokens with the system prompt; the model's "
                                    f"context leaves {limit}: send a shorter message or /system a shorter prompt")
            # Drop the oldest user message and the reply that follows it, keeping turns user-first.
            del self.turns[:2]

    def reply(self, user_text: str, cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream the reply to `user_text` as text deltas; the (possibly partial) reply joins the history.

        A cancelled reply is kept as far as it got, so the next turn sees what the user saw.
        """
        self.turns.append({"role": "user", "content": user_text})
        gen = generate(self.model, self.tok, self.prompt_ids(), self.cfg, cancel=cancel)
        pieces = []
        for step in gen:
            pieces.append(step.text)
            yield step.text
        self.turns.append({"role": "assistant", "content": "".join(pieces)})
        self.last_finish = gen.finish_reason
