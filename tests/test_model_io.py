"""Model folders: save/load round trip, tied weights stored once, refusal of mismatched or partial folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocketlm import PocketLMError
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.io import load_model, save_model


@pytest.fixture
def saved(small_tokenizer, tmp_path: Path) -> tuple[Path, GPT]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size)).eval()
    meta = {"phase": "pretrain", "step": 7, "special_ids": small_tokenizer.special_token_ids()}
    return save_model(tmp_path / "best", model, small_tokenizer.path, meta), model


def test_round_trip_gives_identical_logits(saved, small_tokenizer):
    folder, model = saved
    loaded, tok, meta = load_model(folder)
    idx = torch.randint(0, small_tokenizer.vocab_size, (2, 9))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert not loaded.training
    assert meta == {"phase": "pretrain", "step": 7, "special_ids": {"<|sys|>": 1, "<|usr|>": 2, "<|asst|>": 3,
                                                                    "<|eot|>": 4}}
    assert tok.hash == small_tokenizer.hash and tok.eot_id == 4


def test_folder_contents(saved, small_tokenizer):
    folder, model = saved
    assert sorted(p.name for p in folder.parent.iterdir()) == ["best"]  # no temp folder left behind
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors", "tokenizer.model"]
    tensors = load_file(str(folder / "model.safetensors"))
    assert set(tensors) == set(model.state_dict())  # the tied output projection is not stored twice
    assert sum(t.numel() for t in tensors.values()) == model.num_params()
    info = json.loads((folder / "model.json").read_text())
    assert info["tokenizer_sha256"] == hashlib.sha256(small_tokenizer.path.read_bytes()).hexdigest()
    assert info["config"] == model.cfg.to_dict() and info["vocab_size"] == small_tokenizer.vocab_size
    assert info["special_ids"]["<|eot|>"] == 4


def test_save_replaces_an_existing_folder(saved, small_tokenizer):
    folder, _ = saved
    (folder / "stale.txt").write_text("from an earlier save")
    torch.manual_seed(5)
    other = GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size))
    save_model(folder, other, small_tokenizer.path, {"step": 8})
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["best"]
    loaded, _, meta = load_model(folder)
    assert meta == {"step": 8} and torch.equal(loaded.embed.weight, other.embed.weight)


def test_swapped_tokenizer_is_refused(saved):
    folder, _ = saved
    with (folder / "tokenizer.model").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(PocketLMError, match="tokenizer.model does not match"):
        load_model(folder)


@pytest.mark.parametrize("name", ["model.json", "model.safetensors", "tokenizer.model"])
def test_missing_file_is_named(saved, name: str):
    folder, _ = saved
    (folder / name).unlink()
    with pytest.raises(PocketLMError, match=f"{name} is missing"):
        load_model(folder)
