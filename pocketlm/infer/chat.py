"""A multi-turn chat session: the message history, its commands, and fitting it into the context.

Knows nothing about terminals or HTTP: `pocketlm chat` drives it from stdin, tests drive it
directly, and the server fits its requests' histories with the same `fit_messages`. The history is
kept as messages and re-rendered through the chat template each turn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import torch

from pocketlm import PocketLMError
from pocketlm.infer.generate import generate
from pocketlm.infer.sampling import GenConfig
from pocketlm.tokenizer.chat_template import format_chat_tokens

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt), /help; "
        "start a message with // to send a line that begins with /")
# Room kept for the reply when old turns are dropped: a prompt that fills the context could only end at once.
MIN_REPLY_ROOM = 64


def prompt_limit(context: int, max_new_tokens: int) -> int:
    """The longest prompt that still leaves room for a reply of `max_new_tokens` (64 at most)."""
    return context - min(max_new_tokens, MIN_REPLY_ROOM)


def chat_prompt_ids(tok, messages: Sequence[dict]) -> list[int]:
    """The prompt for a reply. A trailing assistant message is continued (its closing `<|eot|>` is left
    off), so a caller can put words in the model's mouth; otherwise the prompt ends with `<|asst|>`."""
    ids = format_chat_tokens(tok, messages, add_generation_prompt=True)
    return ids[:-1] if messages[-1]["role"] == "assistant" else ids


class FitCancelled(Exception):
    """`fit_messages` stopped because its `cancel` event was set (the server's client went away)."""


def fit_messages(tok, messages: Sequence[dict], limit: int,
                 cancel: threading.Event | None = None) -> tuple[list[int], int]:
    """(prompt ids, number of messages dropped): the oldest non-system messages are dropped, a user
    message with the replies after it at a time, until the prompt is at most `limit` tokens. The last
    message is never dropped; if it cannot fit, PocketLMError says how long it is.

    Linear in the history: each message is tokenized once. The template gives every message its own
    run of ids (role, content, `<|eot|>`), so the prompt's length is the sum of the kept messages'
    lengths plus the end (`<|asst|>`, or a trailing assistant's `<|eot|>` left off), and dropping from
    the front is a running subtraction. `cancel` is checked before each message (FitCancelled)."""
    messages = list(messages)
    if not messages:
        chat_prompt_ids(tok, messages)  # the template's own "messages is empty" error
    n = len(messages)
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), n)
    pieces = []
    for i, m in enumerate(messages):
        if cancel is not None and cancel.is_set():
            raise FitCancelled
        try:  # the last message with the prompt's end: chat_prompt_ids of it alone
            pieces.append(chat_prompt_ids(tok, [m]) if i == n - 1 else format_chat_tokens(tok, [m], False))
        except PocketLMError as e:  # the template numbers a lone message 0: say which one it is
            raise PocketLMError(f"messages[{i}]{str(e).removeprefix('messages[0]')}") from None
    total, start = sum(map(len, pieces)), n_system
    while total > limit:
        if n - start <= 1:
            with_system = " with the system prompt" if n_system else ""
            raise PocketLMError(f"the message is {total} tokens{with_system}; the model's context leaves "
                                f"{limit} for it: send a shorter message"
                                + (" or set a shorter system prompt" if n_system else ""))
        # Drop the oldest message and any replies after it, so the history still starts with a user turn.
        cut = start + 1
        while cut < n - 1 and messages[cut]["role"] == "assistant":
            cut += 1
        total -= sum(len(p) for p in pieces[start:cut])
        start = cut
    return [i for p in pieces[:n_system] + pieces[start:] for i in p], start - n_system


class ChatSession:
    def __init__(self, model: torch.nn.Module, tok, cfg: GenConfig, system: str | None = None) -> None:
        self.model, self.tok, self.cfg = model, tok, cfg
        self.system = system
        self.turns: list[dict[str, str]] = []  # user/assistant messages, oldest first
        self.last_finish: str | None = None

    def command(self, line: str) -> str | None:
        """Handle a `/command` line and return what to tell the user; None if `line` is a message.

        Only a known command name, or a lone /word, is a command: "/usr/bin is a folder" is a message.
        """
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
        if name[:1] == "/" and name[1:].isalpha():
            return f"unknown command {name}; {HELP}"
        return None

    @staticmethod
    def message_text(line: str) -> str:
        """The text a line sends: `//x` sends `/x` (the escape for a message that starts with a slash)."""
        return line[1:] if line.startswith("//") else line

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt_ids(self) -> list[int]:
        """The rendered history, dropping the oldest exchanges until it leaves room to answer. The
        history changes only if the result fits: a last message too long leaves it as it was."""
        limit = prompt_limit(self.model.cfg.block_size, self.cfg.max_new_tokens)
        ids, dropped = fit_messages(self.tok, self.messages(), limit)
        del self.turns[:dropped]
        return ids

    def reply(self, user_text: str, cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream the reply to `user_text` as text deltas; the (possibly partial) reply joins the history.

        A cancelled reply is kept as far as it got, so the next turn sees what the user saw. A message
        too long for the context raises PocketLMError and leaves the history as it was.
        """
        self.turns.append({"role": "user", "content": user_text})
        try:
            ids = self.prompt_ids()
        except PocketLMError:
            self.turns.pop()
            raise
        gen = generate(self.model, self.tok, ids, self.cfg, cancel=cancel)
        pieces = []
        for step in gen:
            pieces.append(step.text)
            yield step.text
        self.turns.append({"role": "assistant", "content": "".join(pieces)})
        self.last_finish = gen.finish_reason
