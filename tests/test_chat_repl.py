"""The chat REPL's edges: a message too long for the context, error wording, lines that start with '/'."""

from __future__ import annotations

import io

import pytest

from pocketlm import PocketLMError
from pocketlm.cli import main
from pocketlm.infer.chat import ChatSession
from pocketlm.infer.sampling import GenConfig

HISTORY = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": " Hi there."}]


def test_too_long_message_keeps_the_history(tiny_model, forced_tokens):
    model, tok = tiny_model
    session = ChatSession(model, tok, GenConfig(max_new_tokens=16))
    session.turns = list(HISTORY)
    with pytest.raises(PocketLMError) as e:
        list(session.reply("word " * 400))
    assert session.turns == HISTORY  # nothing lost, and the failed message is not kept either
    assert "with the system prompt" not in str(e.value) and "system prompt" not in str(e.value)
    session.system = "Be brief."
    with pytest.raises(PocketLMError, match="with the system prompt"):
        list(session.reply("word " * 400))
    assert session.turns == HISTORY
    with forced_tokens(model, tok.encode(" Yes.") + [tok.eot_id]):
        assert "".join(session.reply("Still there?")) == " Yes."
    assert session.turns[:2] == HISTORY and len(session.turns) == 4


def test_only_known_commands_are_commands(tiny_model):
    model, tok = tiny_model
    session = ChatSession(model, tok, GenConfig())
    session.turns = list(HISTORY)
    assert session.command("/usr/bin is a folder") is None
    assert session.command("/etc/hosts") is None
    assert session.command("/nope").startswith("unknown command /nope")
    assert session.command("//reset") is None and session.message_text("//reset") == "/reset"
    assert session.message_text("/usr/bin is a folder") == "/usr/bin is a folder"
    assert session.turns == HISTORY


def test_chat_command_sends_slash_lines_as_messages(tiny_ckpt, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("/usr/bin is a folder\n//help\n/help\n"))
    assert main(["chat", "--ckpt", str(tiny_ckpt), "--max-new-tokens", "4", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.count("model> ") == 2 and err.count("commands:") == 2  # the banner and /help
