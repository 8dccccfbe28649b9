"""What a new user's mistakes get from the command line: one line that names the cause and the fix, no
traceback, and no folder left behind. Each test runs `python -m pocketlm` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pocketlm(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m pocketlm ARGS` from the current folder (whose pocketlm, if any, is the one run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pocketlm", *map(str, args)], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single error line of a failed command (and that nothing else went to stderr)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "error" in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cache(small_cache, data_dir) -> Path:
    """A cache of the small tokenizer with FineWeb, WikiText and the primer chats: no dolly."""
    return small_cache([("fineweb_edu:take=100", "pretrain"), ("wikitext", "eval"), ("primer", "sft")], data_dir)


def tiny_args(cache: Path, runs: Path) -> list[str]:
    return ["--cache", cache, "--runs-dir", runs, "--model", "tiny", "--seq-len", "64", "--micro-batch", "2",
            "--accum-steps", "1", "--pretrain-steps", "2", "--sft-steps", "2", "--eval-every", "2",
            "--eval-batches", "1", "--sample-tokens", "0", "--device", "cpu", "--pretrain-mix", "fineweb_edu=1",
            "--sft-sources", "primer"]


# Row 2: every config field is type-checked when the file is read.
@pytest.mark.parametrize("line, key, wanted", [('micro_batch = "four"', "micro_batch", "an integer"),
                                               ('lr = "3e-3"', "lr", "a number"),
                                               ("compile = 1", "compile", "true or false (or unset)"),
                                               ('sft_sources = "dolly"', "sft_sources", "a list of strings"),
                                               ("eval_sources = [1, 2]", "eval_sources", "a list of strings")])
def test_a_config_value_of_the_wrong_type_is_one_line_naming_key_type_and_value(cache, tmp_path, line, key, wanted):
    config = tmp_path / "bad.toml"
    config.write_text(f"[train]\n{line}\n")
    err = one_line_error(pocketlm("train", "--config", config, *tiny_args(cache, tmp_path / "runs")))
    value = line.split(" = ", 1)[1].strip('"')
    assert f"{config} [train]: {key} must be {wanted}, got" in err and value in err, err
    assert not (tmp_path / "runs").exists()


def test_a_model_table_of_the_wrong_type_is_one_line(cache, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[model]\nn_layer = 2.5\n")
    err = one_line_error(pocketlm("train", "--config", config, *tiny_args(cache, tmp_path / "runs")))
    assert f"{config} [model]: n_layer must be an integer, got 2.5" in err


# Row 5: --resume of a run that does not exist.
def test_resume_of_a_run_that_never_started_says_there_is_nothing_to_resume(cache, tmp_path):
    err = one_line_error(pocketlm("train", "--name", "never", "--resume", *tiny_args(cache, tmp_path / "runs")))
    assert "nothing to resume" in err and "without --resume" in err, err
    assert not (tmp_path / "runs").exists()


# Row 6: every phase's sources are checked before the first step.
def test_a_missing_sft_source_fails_before_pretraining(cache, tmp_path):
    proc = pocketlm("train", "--name", "mine", *tiny_args(cache, tmp_path / "runs"), "--sft-sources", "dolly")
    err = one_line_error(proc)
    assert "sft phase needs sft source(s) dolly" in err and "primer" in err, err
    assert "pretrain" not in proc.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how", [["--phase", "sft"], ["--init", "nowhere/best"]])
def test_sft_without_a_model_to_start_from_fails_before_any_folder(cache, tmp_path, how):
    err = one_line_error(pocketlm("train", "--name", "mine", *how, *tiny_args(cache, tmp_path / "runs")))
    assert "SFT starts from" in err and "--init" in err, err
    assert not (tmp_path / "runs").exists()


# Row 7: too small a vocabulary gets the right hint, and the minimum.
def test_too_small_a_vocabulary_says_so_and_the_minimum(tmp_path):
    out = tmp_path / "tok"
    err = one_line_error(pocketlm("tokenizer", "train", "--sources", REPO / "tests/data/gutenberg/74-0.txt",
                                  "--out", out, "--vocab-size", "100"))
    assert "--vocab-size 100 is too small" in err and "use --vocab-size 460 or more" in err, err
    assert "lower --vocab-size" not in err
    assert not out.exists()  # no half tokenizer folder
    ok = pocketlm("tokenizer", "train", "--sources", REPO / "tests/data/gutenberg/74-0.txt", "--out", out,
                  "--vocab-size", "460")
    assert ok.returncode == 0, ok.stderr[-2000:]


# Paper cuts, in-process through `pocketlm.cli.main` (what `python -m pocketlm` runs): faster, as faithful.

def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    from pocketlm.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def scripted_input(monkeypatch, lines: list):
    """input() that answers with `lines` in turn (an exception instance is raised: Ctrl-C, Ctrl-D)."""
    it = iter(lines)

    def fake_input(prompt: str = "") -> str:
        print(prompt, end="")
        item = next(it, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)


def test_chat_ctrl_c_at_the_prompt_keeps_the_conversation_and_a_long_message_shows_no_reply(
        tiny_ckpt, capsys, monkeypatch):
    from pocketlm.infer.chat import ChatSession

    seen = []
    prompt_ids = ChatSession.prompt_ids
    monkeypatch.setattr(ChatSession, "prompt_ids", lambda self: seen.append(len(self.turns)) or prompt_ids(self))
    scripted_input(monkeypatch, ["Hi", KeyboardInterrupt(), "word " * 400, "Again", EOFError()])
    code, out, err = run_main(["chat", "--ckpt", tiny_ckpt, "--max-new-tokens", "4", "--seed", "0"], capsys)
    assert code == 0, err
    assert seen == [1, 3, 3]  # after Ctrl-C and the refused message, "Again" follows the first exchange
    assert out.count("model> ") == 2  # "Hi" and "Again"; none for the message that was too long
    assert "[the message is" in err and "send a shorter message" in err
    assert "Ctrl-C clears the line" in err
    assert "readline" in sys.modules  # line editing and history at the prompt


def test_ckpt_that_is_a_run_or_a_cache_folder_says_what_it_is_and_which_to_pass(tiny_ckpt, cache, tmp_path, capsys):
    import shutil

    run = tmp_path / "runs" / "mine"
    shutil.copytree(tiny_ckpt, run / "sft" / "best")
    (run / "metrics.jsonl").write_text("")
    for folder, what, instead in ((run, "a run folder", run / "sft" / "best"),
                                  (tmp_path / "runs", "a run folder", run / "sft" / "best"),
                                  (run / "sft", "a training phase's folder", run / "sft" / "best")):
        code, _, err = run_main(["generate", "--ckpt", folder, "--prompt", "Hi"], capsys)
        assert code == 1
        assert err == f"pocketlm: error: {folder} is {what}, not a model; pass its model: --ckpt {instead}\n"
    code, _, err = run_main(["chat", "--ckpt", cache], capsys)
    assert code == 1 and err.startswith(f"pocketlm: error: {cache} is a token cache, not a model; pass a model folder")
    # A model's weights file stands for its folder.
    code, out, err = run_main(["generate", "--ckpt", run / "sft" / "best" / "model.safetensors", "--prompt", "Hi",
                               "--max-new-tokens", "2", "--seed", "0"], capsys)
    assert code == 0, err


def test_plot_of_a_quickstart_folder_finds_its_run(tmp_path, capsys):
    run = tmp_path / "quickstart" / "run"
    run.mkdir(parents=True)
    rows = [{"kind": "train", "phase": "pretrain", "step": s, "loss": 5.0 - s / 10} for s in (1, 2)]
    rows += [{"kind": "eval", "phase": "pretrain", "step": 2, "source": "all", "loss": 4.9, "bpb": 2.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_main(["plot", tmp_path / "quickstart"], capsys)
    assert code == 0, err
    assert out.split() == [str(run / "loss.png"), str(run / "bpb.png")]


def test_generate_that_fills_the_context_names_the_context_length(tiny_ckpt, capsys):
    from pocketlm.model.io import load_model

    model, tok, _ = load_model(tiny_ckpt)
    n = next(n for n in range(1, 400) if len(tok.encode("the cat " * n)) >= model.cfg.block_size - 1)
    prompt = "the cat " * n
    code, _, err = run_main(["generate", "--ckpt", tiny_ckpt, "--prompt", prompt, "--max-new-tokens", "200",
                             "--temperature", "0"], capsys)
    assert code == 0, err
    assert f"[length (the model's {model.cfg.block_size}-token context): " in err, err


# Row 1, for `pocketlm train`: SFT records what it started from; a stale chain is refused, not continued.
def test_sft_resumed_after_pretraining_changed_is_refused_with_one_line(cache, tmp_path):
    from pocketlm.train.config import TrainConfig
    from pocketlm.train.run import train

    runs = tmp_path / "runs"
    base = dict(name="mine", runs_dir=str(runs), cache=str(cache), model="tiny", seq_len=64, micro_batch=2,
                accum_steps=1, pretrain_steps=2, sft_steps=4, eval_every=2, eval_batches=1, sample_tokens=0,
                device="cpu", pretrain_mix=("fineweb_edu=1",), sft_sources=("primer",), warmup_steps=1)
    train(TrainConfig(**{**base, "sft_steps": 2}))
    sft_started = json.loads((runs / "mine" / "sft" / "started_from.json").read_text())
    assert sft_started["from"] == str(runs / "mine" / "pretrain" / "best")
    # More pretraining: a better pretrain/best than the one SFT started from.
    train(TrainConfig(**{**base, "pretrain_steps": 6, "patience": 0}), pipeline="pretrain", resume=True)
    from pocketlm.files import sha256_file
    assert sha256_file(runs / "mine" / "pretrain" / "best" / "model.safetensors") != sft_started["sha256"]
    err = one_line_error(pocketlm("train", "--name", "mine", "--phase", "sft", "--resume",
                                  *tiny_args(cache, runs), "--sft-steps", "4"))
    assert f"{runs / 'mine' / 'sft'} is stale: it started from {runs / 'mine' / 'pretrain' / 'best'}" in err, err


def test_quickstart_refuses_an_unusable_device_before_building_anything(tmp_path, capsys):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    code, out, err = run_main(["quickstart", "--out", tmp_path / "qs", "--device", "mps"], capsys)
    assert code == 1 and err == "pocketlm: error: --device mps but MPS is not available; use --device auto or cpu\n"
    assert out == "" and not (tmp_path / "qs").exists()


@pytest.mark.parametrize("command, shown", [
    (["eval"], ["validation batches per source (default: 50)", "rows per batch (default: 8)"]),
    (["quickstart"], ["(default: runs/quickstart)", "(default: up to 1500 pretrain steps, with early stopping, and 60"]),
    (["cache", "build"], ["required (here or in the --config file):\n  --tokenizer", "  --out OUT"]),
])
def test_help_pages_show_defaults_and_what_is_required(command, shown, capsys):
    code, out, _ = run_main([*command, "--help"], capsys)
    text = " ".join(out.split())  # argparse wraps to the terminal's width
    assert code == 0
    for s in shown:
        assert " ".join(s.split()) in text or s in out, (s, out)
    assert "quickstart.toml" not in out
