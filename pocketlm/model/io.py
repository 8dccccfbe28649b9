"""Model folders: `model.safetensors` + `model.json` + `tokenizer.model`, self-contained and checked.

`model.json` holds the GPTConfig, the tokenizer's sha256 (a folder whose tokenizer was swapped is
refused), the vocab size, the special ids when the caller passes them in `meta["special_ids"]`, and
the caller's `meta`. Weights are stored once (the output projection is the tied embedding).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pocketlm import PocketLMError
from pocketlm.config import from_dict
from pocketlm.files import publish_dir, sha256_file, staging_dir
from pocketlm.model.config import GPTConfig
from pocketlm.model.gpt_v1 import GPT
from pocketlm.tokenizer.tokenizer_sp import MODEL_FILE as TOKENIZER_FILE
from pocketlm.tokenizer.tokenizer_sp import Tokenizer

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "model.json"
FORMAT = "pocketlm-model"
FORMAT_VERSION = 1


def save_model(dir: str | Path, model: GPT, tokenizer_path: str | Path, meta: dict[str, Any]) -> Path:
    """Write a model folder at `dir`, replacing any folder there; returns its path.

    Everything is written to `dir.tmp` first and renamed into place, so a crash never leaves a
    half-written folder under the real name.
    """
    out = Path(dir).expanduser()
    tok_src = Path(tokenizer_path).expanduser()
    if not tok_src.is_file():
        raise PocketLMError(f"tokenizer model {tok_src} not found: pass the tokenizer.model the model was trained with")
    tmp = staging_dir(out)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    shutil.copyfile(tok_src, tmp / TOKENIZER_FILE)
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": model.cfg.to_dict(),
        "n_params": model.num_params(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokenizer_sha256": sha256_file(tmp / TOKENIZER_FILE), "vocab_size": model.cfg.vocab_size,
        "special_ids": meta.get("special_ids"), "meta": meta,
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    publish_dir(tmp, out)
    return out


def _what_instead(folder: Path) -> str:
    """What `folder` is when it is not a model folder, and the model folder to pass instead."""
    if (folder / "meta.json").is_file() and not (folder / INFO_FILE).exists():
        return f"{folder} is a token cache, not a model; pass a model folder such as runs/NAME/sft/best"
    if folder.is_file():
        if folder.name in (WEIGHTS_FILE, INFO_FILE, TOKENIZER_FILE):
            return f"{folder} is a file of a model folder; pass the folder: --ckpt {folder.parent}"
        return f"{folder} is a file, not a model folder; pass a folder such as runs/NAME/sft/best"
    for sub in ("best", "sft/best", "pretrain/best", "run/sft/best", "*/sft/best"):
        found = sorted(p for p in folder.glob(sub) if (p / INFO_FILE).is_file())
        if found:
            kind = {"best": "a training phase's folder", "run/sft/best": "a quickstart folder"}.get(sub, "a run folder")
            return f"{folder} is {kind}, not a model; pass its model: --ckpt {found[0]}"
    return (f"{folder / INFO_FILE} is missing: {folder} is not a model folder; pass one such as "
            "runs/NAME/sft/best (model.safetensors, model.json, tokenizer.model)")


def model_folder(dir: str | Path) -> Path:
    """The folder a --ckpt names: the folder itself, or the folder of a model file given in its place."""
    path = Path(dir).expanduser()
    if path.is_file() and path.name in (WEIGHTS_FILE, INFO_FILE) and (path.parent / INFO_FILE).is_file():
        return path.parent
    return path


def read_model_folder(dir: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Check a model folder and read it: (config, CPU state dict, model.json contents)."""
    folder = Path(dir).expanduser()
    if not folder.exists():
        raise PocketLMError(f"model folder {folder} not found: pass a folder written by training or 'pocketlm import'")
    if not (folder / INFO_FILE).is_file():
        raise PocketLMError(_what_instead(folder))
    for name in (WEIGHTS_FILE, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise PocketLMError(f"{folder / name} is missing: {folder} is not a complete model folder; "
                                "re-save it or point to another checkpoint")
    info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    if info.get("format") != FORMAT:
        raise PocketLMError(f"{folder / INFO_FILE}: not a pocketlm model file (format {info.get('format')!r})")
    actual = sha256_file(folder / TOKENIZER_FILE)
    if actual != info["tokenizer_sha256"]:
        raise PocketLMError(f"{folder / TOKENIZER_FILE} does not match the tokenizer this model was trained with "
                            f"(sha256 {actual[:12]}… vs {info['tokenizer_sha256'][:12]}… in {INFO_FILE}); "
                            "copy the original tokenizer.model back")
    cfg = from_dict(GPTConfig, info["config"], where=str(folder / INFO_FILE))
    return cfg, load_file(str(folder / WEIGHTS_FILE), device="cpu"), info


def load_model(dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Any, dict[str, Any]]:
    """Load a model folder: (GPT in eval mode on `device`, Tokenizer, the meta it was saved with).

    Weights are read to CPU inside this function, so nothing but the model keeps them alive.
    """
    dir = model_folder(dir)
    cfg, state, info = read_model_folder(dir)
    tok = Tokenizer.load(dir / TOKENIZER_FILE)
    if tok.vocab_size > cfg.vocab_size:
        raise PocketLMError(f"{dir}: tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}; "
                            "the folder mixes files from different runs")
    model = GPT(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), tok, info["meta"]
