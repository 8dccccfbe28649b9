"""The chat session (history, commands, context trimming) and the `generate` / `chat` commands."""

from __future__ import annotations

import io
import threading

import pytest

from pocketlm import PocketLMError
from pocketlm.cli import main
from pocketlm.infer.chat import ChatSession
from pocketlm.infer.sampling import GenConfig
from pocketlm.tokenizer.chat_template import format_chat_tokens


def test_history_goes_through_the_template(tiny_model, forced_tokens):
    model, tok = tiny_model
    session = ChatSession(model, tok, GenConfig(max_new_tokens=30), system="Be brief.")
    with forced_tokens(model, tok.encode(" Hi there.") + [tok.eot_id]):
        assert "".join(session.reply("Hello")) == " Hi there."
    with forced_tokens(model, tok.encode(" Bye.") + [tok.eot_id]):
        assert "".join(session.reply("Goodbye")) == " Bye."
    assert session.last_finish == "eot"
    assert session.messages() == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": " Hi there."}, {"role": "user", "content": "Goodbye"},
        {"role": "assistant", "content": " Bye."}]
    # A history that ends with the assistant's turn is continued: its closing <|eot|> is left off.
    assert session.prompt_ids() == format_chat_tokens(tok, session.messages())[:-1]


def test_commands(tiny_model):
    model, tok = tiny_model
    session = ChatSession(model, tok, GenConfig())
    session.turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert session.command("hello") is None
    assert session.command("/reset") == "conversation reset" and session.turns == []
    assert session.command("/system You are a cat.").startswith("system prompt set")
    assert session.messages() == [{"role": "system", "content": "You are a cat."}]
    assert session.command("/nope").startswith("unknown command /nope")


def test_cancel_keeps_the_partial_reply(tiny_model, forced_tokens):
    model, tok = tiny_model
    session = ChatSession(model, tok, GenConfig(max_new_tokens=50))
    cancel = threading.Event()
    a = tok.encode("a")[0]
    pieces = []
    with forced_tokens(model, [a]):
        for piece in session.reply("Say a lot", cancel):
            pieces.append(piece)
            if len(pieces) == 3:
                cancel.set()
    assert session.last_finish == "cancelled"
    assert session.turns[-1] == {"role": "assistant", "content": "aaa"}


def test_long_history_drops_oldest_exchanges(tiny_model):
    model, tok = tiny_model
    session = ChatSession(model, tok, GenConfig(max_new_tokens=16))
    words = "one two three four five six seven eight nine ten " * 2
    for i in range(6):
        session.turns += [{"role": "user", "content": f"{i} {words}"}, {"role": "assistant", "content": words}]
    session.turns.append({"role": "user", "content": "last"})
    ids = session.prompt_ids()
    assert len(ids) <= model.cfg.block_size - 16
    assert session.turns[0]["role"] == "user" and session.turns[-1]["content"] == "last"
    assert len(session.turns) < 13
    session.turns = [{"role": "user", "content": words * 10}]
    with pytest.raises(PocketLMError, match="send a shorter message"):
        session.prompt_ids()


def test_generate_command(tiny_ckpt, capsys):
    assert main(["generate", "--ckpt", str(tiny_ckpt), "--prompt", "The river", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "\ufffd" not in out
    assert err.startswith("[") and "prefill" in err and "tok/s" in err


def test_generate_command_errors(tiny_ckpt, tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert "model folder" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(tiny_ckpt), "--prompt", "x", "--top-p", "0"]) == 1
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_chat_command_reads_turns_and_commands(tiny_ckpt, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\n/system Be kind.\nHi again\n"))
    assert main(["chat", "--ckpt", str(tiny_ckpt), "--max-new-tokens", "8", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.count("model> ") == 2
    assert "[conversation reset]" in err and "[system prompt set; conversation reset]" in err
