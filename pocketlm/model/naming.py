"""A model's public name, from the path a user typed: `runs/mine/sft/best` -> `mine-sft-best`.

The server's model id and every export's name (GGUF `general.name`, the HF model card) come from here,
so one model has one name everywhere. The path is read as typed, never resolved: `best` and `last` are
symlinks to hidden folders (`.best-000800-2b959d2b`, see train/checkpoint.py) whose names mean nothing
to a user; reached some other way (`cd runs/mine/sft/best && … --ckpt .`), a hidden folder is named by
its link. No other part of the path is used: an absolute path would tell every client where files live.
"""

from __future__ import annotations

import os
import re

from pocketlm import PocketLMError

CHECKPOINT_KINDS = ("best", "last")
DEFAULT_NAME = "pocketlm"
# The hidden folder a checkpoint link points to: `.{kind}-{step:06d}-{uuid8}` (train/checkpoint.py).
_HIDDEN_CHECKPOINT = re.compile(rf"^\.({'|'.join(CHECKPOINT_KINDS)})-\d+-[0-9a-f]+$")


def model_id(ckpt: str | os.PathLike[str]) -> str:
    """`runs/mine/pretrain/best` -> `mine-pretrain-best` (also through its hidden target); any other
    folder -> its own name; `/` -> `pocketlm`."""
    # Lexical (symlinks are not followed); relative to the working folder so `--ckpt best` typed in
    # runs/mine/sft is named like runs/mine/sft/best.
    parts = [p for p in os.path.abspath(os.fspath(ckpt)).split(os.sep) if p]
    if parts and (hidden := _HIDDEN_CHECKPOINT.match(parts[-1])):
        parts[-1] = hidden.group(1)
    if len(parts) >= 3 and parts[-1] in CHECKPOINT_KINDS:
        return "-".join(parts[-3:])
    return parts[-1] if parts else DEFAULT_NAME


def export_name(ckpt: str | os.PathLike[str], name: str | None) -> str:
    """The name an export carries: `--name`, checked, or the model's id."""
    if name is None:
        return model_id(ckpt)
    if not name.strip() or not name.isprintable():
        raise PocketLMError(f"--name {name!r} is not a usable model name; pass printable text, e.g. --name mine-sft")
    return name
