"""Every subcommand, found from the parser, given a missing path, a wrong type and an out-of-range number:
each answer is one error line, never a traceback, and nothing is left on disk.

In-process through `pocketlm.cli.main`, which is what `python -m pocketlm` runs (an exception escaping it
is the traceback a user would see); a subprocess per call would cost seconds each on a small machine.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pocketlm.cli import build_parser, main

# Where a command has no required path, the option that gets the missing one (the first it has).
PATH_OPTIONS = ("--config", "--ckpt", "--cache", "--tokenizer")


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from leaves(sub, path + (name,))


def numeric_options(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] for a in parser._actions
            if a.option_strings and getattr(a.type, "__name__", "") in ("int", "float", "positive")]


def base_args(parser: argparse.ArgumentParser, missing: Path) -> list[str] | None:
    """The command with every required argument (or its first path option) pointing at a missing path."""
    args: list[str] = []
    for a in parser._actions:
        if a.dest == "help" or isinstance(a, argparse._SubParsersAction):
            continue
        if not a.option_strings:
            args.append(str(missing))
        elif a.required:
            args += [a.option_strings[0], str(missing)]
    if args:
        return args
    options = {o for a in parser._actions for o in a.option_strings}
    first = next((o for o in PATH_OPTIONS if o in options), None)
    return None if first is None else [first, str(missing)]


def invocations(missing: Path) -> list[tuple[str, list[str]]]:
    out = []
    for path, parser in leaves(build_parser()):
        base = base_args(parser, missing)
        if base is None:  # nothing to point at a missing path (`data list`): it would just run
            continue
        out.append(("missing path", [*path, *base]))
        numbers = numeric_options(parser)
        if numbers:
            out.append(("wrong type", [*path, *base, numbers[0], "abc"]))
            out.append(("out of range", [*path, *base, *(x for n in numbers for x in (n, "-1"))]))
    return out


def test_every_subcommand_answers_bad_input_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a command that wrongly went ahead would write here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "missing" / "x"
    calls = invocations(missing)
    commands = {" ".join(args[:2]) if args[0] in ("tokenizer", "data", "cache", "export", "import") else args[0]
                for _, args in calls}
    assert len(commands) >= 15 and len(calls) >= 35, commands  # the sweep found the whole command line
    failures = []
    for what, args in calls:
        try:
            code = main(args)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        except Exception as e:  # noqa: BLE001 (any other exception is a traceback for the user)
            failures.append(f"{what}: pocketlm {' '.join(args)} -> {type(e).__name__}: {e}")
            continue
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        if code == 0 or len(lines) != 1 or "error" not in lines[0]:
            failures.append(f"{what}: pocketlm {' '.join(args)} -> exit {code}, stderr {err!r}")
        left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
        if left:
            failures.append(f"{what}: pocketlm {' '.join(args)} left {left}")
            for p in tmp_path.iterdir():  # so the next command is judged on its own
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert not failures, "\n".join(failures)


def test_out_of_range_numbers_with_real_inputs_are_one_line(tiny_ckpt, small_cache, data_dir, tmp_path, monkeypatch,
                                                            capsys):
    """The same numbers where every path is real, so nothing but the numbers can fail."""
    import io

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    cache = small_cache([("fineweb_edu:take=50", "pretrain"), ("primer", "sft")], data_dir)
    capsys.readouterr()  # what building the cache said
    real = {"--ckpt": tiny_ckpt, "--cache": cache, "--prompt": "Hi", "--out": tmp_path / "out",
            "--sources": data_dir / "gutenberg" / "74-0.txt"}
    parsers = dict(leaves(build_parser()))
    failures = []
    for path in (("tokenizer", "train"), ("train",), ("eval",), ("generate",), ("chat",)):
        parser = parsers[path]
        required = [x for a in parser._actions if a.required
                    for x in (a.option_strings[0], str(real[a.option_strings[0]]))]
        extra = ["--cache", str(cache)] if path == ("train",) else []
        args = [*path, *required, *extra, *(x for n in numeric_options(parser) for x in (n, "-1"))]
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
        except Exception as e:  # noqa: BLE001
            failures.append(f"pocketlm {' '.join(args)} -> {type(e).__name__}: {e}")
            continue
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        if code == 0 or len(lines) != 1 or "error" not in lines[0]:
            failures.append(f"pocketlm {' '.join(args)} -> exit {code}, stderr {lines}")
    assert not failures, "\n".join(failures)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
