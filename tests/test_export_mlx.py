"""mlx-lm (on CPU, `mlx[cpu]`) chats with `pocketlm export hf` from plain text and agrees with pocketlm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pocketlm.model.hf_bridge import export_hf
from pocketlm.model.io import load_model


def test_mlx_lm_chat_template_and_greedy_ids(tiny_ckpt: Path, tmp_path: Path, export_chats, need_client, pocketlm_reply,
                                             reply_tokens):
    need_client("mlx.core", "install mlx[cpu] on Linux (mlx on macOS) from PyPI")
    mlx_lm = need_client("mlx_lm", "install mlx-lm from PyPI")
    model, tok, _ = load_model(tiny_ckpt)
    out = export_hf(tiny_ckpt, tmp_path / "hf")
    mlx_model, mlx_tok = mlx_lm.load(str(out))
    for chat in export_chats:
        prompt, reply = pocketlm_reply(model, tok, chat)
        assert mlx_tok.apply_chat_template(chat, add_generation_prompt=True) == prompt
        got = [r.token for r in mlx_lm.stream_generate(mlx_model, mlx_tok, prompt, max_tokens=reply_tokens)]
        assert got == reply


def test_mlx_lm_chat_command_replies_as_pocketlm(tiny_ckpt: Path, tmp_path: Path, export_chats, need_client,
                                                 pocketlm_reply, reply_tokens):
    """The README's line, `mlx_lm.chat --model hf/`, typed into as a user would."""
    need_client("mlx_lm", "install mlx-lm and mlx[cpu] from PyPI")
    model, tok, _ = load_model(tiny_ckpt)
    out = export_hf(tiny_ckpt, tmp_path / "hf")
    chat = export_chats[1]
    expected = tok.decode(pocketlm_reply(model, tok, chat)[1], skip_special=True)
    assert expected.strip()
    cli = Path(sys.executable).with_name("mlx_lm.chat")
    run = subprocess.run([str(cli), "--model", str(out), "--max-tokens", str(reply_tokens)],
                         input=f"{chat[0]['content']}\nq\n", capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TERM": "dumb", "NO_COLOR": "1"})
    assert run.returncode == 0, run.stderr
    assert expected in run.stdout, run.stdout
