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


def read_model_folder(dir: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Check a model folder and read it: (config, CPU state dict, model.json contents)."""
    folder = Path(dir).expanduser()
    if not folder.is_dir():
        raise PocketLMError(f"model folder {folder} not found: pass a folder written by training or 'pocketlm import'")
    for name in (INFO_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
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
    cfg, state, info = read_model_folder(dir)
    tok = Tokenizer.load(Path(dir).expanduser() / TOKENIZER_FILE)
    if tok.vocab_size > cfg.vocab_size:
        raise PocketLMError(f"{dir}: tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}; "
                            "the folder mixes files from different runs")
    model = GPT(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), tok, info["meta"]
