"""`pocketlm export` as a user runs it (subprocess): exports are named as the server names the model, never
after the hidden folder a `best` link points to, and an `--out` that pocketlm must not replace gets one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketlm.cli import main
from pocketlm.model import GPT, GPTConfig
from pocketlm.serve.cli import model_name
from pocketlm.train.checkpoint import save_checkpoint

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (export and test extras)")


def _pocketlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command as a user types it, in its own process."""
    return subprocess.run([sys.executable, "-m", "pocketlm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """The same command in this process (a subprocess each costs seconds of imports on a small machine)."""
    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def _one_line_error(run: subprocess.CompletedProcess, *words: str) -> None:
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    for word in words:
        assert word in run.stderr, run.stderr


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(small_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding runs/mine/pretrain/best, written by training's own checkpoint code: a `best` symlink
    to a hidden `.best-000800-…` folder."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size))
    save_checkpoint(root / "runs" / "mine" / "pretrain", "best", model, small_tokenizer.path,
                    {"special_ids": small_tokenizer.special_token_ids()}, {"step": 800})
    best = root / "runs" / "mine" / "pretrain" / "best"
    assert best.is_symlink() and best.resolve().name.startswith(".best-000800-")
    return root


def test_model_id_follows_the_typed_path(run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    from pocketlm.model.naming import model_id

    hidden = (run_dir / "runs/mine/pretrain/best").resolve()
    assert model_id(run_dir / "runs/mine/pretrain/best") == "mine-pretrain-best"
    assert model_id(hidden) == "mine-pretrain-best"  # reached through its target, it is still named by its link
    assert model_id("/home/me/runs/mine/sft/last/") == "mine-sft-last"
    assert model_id("/data/exported-model") == "exported-model" and model_id("/") == "pocketlm"
    monkeypatch.chdir(hidden)  # cd runs/mine/pretrain/best; --ckpt .
    assert model_id(".") == "mine-pretrain-best"
    monkeypatch.chdir(hidden.parent)
    assert model_id("best") == "mine-pretrain-best"
    assert model_name("best") == model_id("best")  # the server's id is the same name


def test_exports_of_a_symlinked_best_are_named_as_the_server_names_them(run_dir: Path, tmp_path: Path, cli):
    ckpt = "runs/mine/pretrain/best"
    hidden = (run_dir / ckpt).resolve().name
    gguf_run = _pocketlm("export", "gguf", "--ckpt", ckpt, "--out", str(tmp_path / "mine.gguf"), cwd=run_dir)
    assert gguf_run.returncode == 0, gguf_run.stderr
    assert _pocketlm("export", "hf", "--ckpt", ckpt, "--out", str(tmp_path / "hf"), cwd=run_dir).returncode == 0
    reader = gguf.GGUFReader(tmp_path / "mine.gguf")
    field = reader.fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == "mine-pretrain-best"
    # The model card's name is what llama.cpp's convert_hf_to_gguf.py reads for general.name.
    assert gguf.Metadata.load(model_path=tmp_path / "hf").name == "mine-pretrain-best"
    assert json.loads((tmp_path / "hf" / "pocketlm-export.json").read_text())["name"] == "mine-pretrain-best"
    # Nothing exported carries the hidden folder's name or where the run lives.
    for path in [tmp_path / "mine.gguf", *(tmp_path / "hf").iterdir()]:
        data = path.read_bytes()
        assert hidden.encode() not in data and b".best-" not in data and str(run_dir).encode() not in data, path

    assert cli("export", "gguf", "--ckpt", ckpt, "--out", str(tmp_path / "n.gguf"), "--name", "my model",
                     cwd=run_dir).returncode == 0
    field = gguf.GGUFReader(tmp_path / "n.gguf").fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == "my model"
    _one_line_error(cli("export", "hf", "--ckpt", ckpt, "--out", str(tmp_path / "x"), "--name", "a\nb",
                              cwd=run_dir), "--name")
    assert not (tmp_path / "x").exists()


def test_export_gguf_into_an_existing_folder_is_one_line(run_dir: Path, tmp_path: Path, cli):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    run = _pocketlm("export", "gguf", "--ckpt", "runs/mine/pretrain/best", "--out", str(folder), cwd=run_dir)
    _one_line_error(run, f"--out {folder} is a folder", f"--out {folder}/mine-pretrain-best.gguf")
    assert _tree(folder) == {"notes.txt": b"mine\n"} and not list(tmp_path.glob("*.tmp"))
    # A file that is not a GGUF is not overwritten either, unless --force.
    notes = folder / "notes.txt"
    _one_line_error(cli("export", "gguf", "--ckpt", "runs/mine/pretrain/best", "--out", str(notes),
                              cwd=run_dir), "is not a GGUF file", "--force")
    assert notes.read_text() == "mine\n"


def test_export_hf_never_deletes_what_pocketlm_did_not_write(run_dir: Path, tmp_path: Path, cli):
    ckpt = "runs/mine/pretrain/best"
    folder = tmp_path / "work"
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "config.json").write_text('{"mine": true}\n')
    (folder / "data" / "a.csv").write_text("1,2\n")
    before = _tree(folder)
    _one_line_error(_pocketlm("export", "hf", "--ckpt", ckpt, "--out", str(folder), cwd=run_dir),
                    "holds files pocketlm did not write", "config.json", "--force")
    assert _tree(folder) == before and not (tmp_path / "work.tmp").exists()
    _one_line_error(cli("export", "hf", "--ckpt", ckpt, "--out", str(folder / "notes.txt"), cwd=run_dir),
                    "is a file")
    assert _tree(folder) == before

    # --force writes the export among them: the user's other files stay, the same-named config.json is replaced.
    assert cli("export", "hf", "--ckpt", ckpt, "--out", str(folder), "--force", cwd=run_dir).returncode == 0
    after = _tree(folder)
    assert after["notes.txt"] == before["notes.txt"] and after["data/a.csv"] == before["data/a.csv"]
    assert json.loads(after["config.json"])["architectures"] == ["LlamaForCausalLM"]
    (tmp_path / "odd" / "config.json").mkdir(parents=True)  # a folder where the export writes a file
    _one_line_error(cli("export", "hf", "--ckpt", ckpt, "--out", str(tmp_path / "odd"), "--force", cwd=run_dir),
                    "holds a folder named config.json")
    # The folder still holds files pocketlm did not write: exporting there again needs --force again.
    _one_line_error(cli("export", "hf", "--ckpt", ckpt, "--out", str(folder), cwd=run_dir), "notes.txt")

    # An earlier export (recognized by its manifest) is replaced without asking, and an empty folder is used.
    hf = tmp_path / "hf"
    assert cli("export", "hf", "--ckpt", ckpt, "--out", str(hf), cwd=run_dir).returncode == 0
    first = _tree(hf)
    assert cli("export", "hf", "--ckpt", ckpt, "--out", str(hf), "--name", "again", cwd=run_dir).returncode == 0
    assert sorted(_tree(hf)) == sorted(first) and b"again" in (hf / "README.md").read_bytes()
    (tmp_path / "empty").mkdir()
    assert cli("export", "hf", "--ckpt", ckpt, "--out", str(tmp_path / "empty"), cwd=run_dir).returncode == 0
    assert sorted(_tree(tmp_path / "empty")) == sorted(first)
