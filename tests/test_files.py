"""pocketlm/files.py: what it writes gets the mode a plain open()/mkdir() would give (the umask respected),
including a model folder whose weights safetensors writes through a private 0600 temporary."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pocketlm.files import AtomicFile, atomic_write, publish_dir, staging_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_umask_is_read_without_changing_it(mask):
    from pocketlm.files import umask

    assert umask() == mask
    assert umask() == mask


def test_atomic_write_and_atomic_file_modes(mask, tmp_path: Path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"reference")  # what open() gives under this umask
    assert _mode(plain) == 0o666 & ~mask
    atomic_write(tmp_path / "a.bin", b"abc")
    assert _mode(tmp_path / "a.bin") == 0o666 & ~mask
    # A NAME.tmp left behind by a killed process, private: the file written through it is not.
    (tmp_path / "b.bin.tmp").write_bytes(b"old")
    os.chmod(tmp_path / "b.bin.tmp", 0o600)
    f = AtomicFile(tmp_path / "b.bin")
    f.write(b"new")
    f.close()
    assert _mode(tmp_path / "b.bin") == 0o666 & ~mask and (tmp_path / "b.bin").read_bytes() == b"new"


def test_staged_folder_modes(mask, tmp_path: Path):
    tmp = staging_dir(tmp_path / "deep" / "out")
    assert _mode(tmp) == _mode(tmp_path / "deep") == 0o777 & ~mask
    (tmp / "sub").mkdir()
    (tmp / "sub" / "private").write_bytes(b"x")
    os.chmod(tmp / "sub" / "private", 0o600)  # as safetensors' save_file leaves its file
    publish_dir(tmp, tmp_path / "deep" / "out")
    out = tmp_path / "deep" / "out"
    assert _mode(out) == _mode(out / "sub") == 0o777 & ~mask
    assert _mode(out / "sub" / "private") == 0o666 & ~mask


def test_saved_model_folder_modes(mask, small_tokenizer, tmp_path: Path):
    from pocketlm.model import GPT, GPTConfig
    from pocketlm.model.io import WEIGHTS_FILE, load_model, save_model

    out = save_model(tmp_path / "best", GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size)),
                     small_tokenizer.path, {})
    assert _mode(out) == 0o777 & ~mask
    assert {p.name: _mode(p) for p in out.iterdir()} == {
        WEIGHTS_FILE: 0o666 & ~mask, "model.json": 0o666 & ~mask, "tokenizer.model": 0o666 & ~mask}
    load_model(out)  # still a good folder
