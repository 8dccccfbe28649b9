"""The `pocketlm` command line: one subcommand per pipeline stage.

Each stage owns a small `cli.py` with `register(subparsers)`; heavy imports (torch, datasets) happen
inside the handlers, so `pocketlm --help` stays fast. Handlers return an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pocketlm import PocketLMError, __version__

# (module with a `register(subparsers)` function); order is the order shown in --help.
STAGES = (
    "pocketlm.tokenizer.cli",
    "pocketlm.data.cli",
    "pocketlm.cache.cli",
    "pocketlm.train.cli",
    "pocketlm.infer.cli",
    "pocketlm.serve.cli",
    "pocketlm.model.cli",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error over several lines; users asked for one line and a pointer."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pocketlm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pocketlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for mod in STAGES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if os.environ.get("POCKETLM_MPS_RULES") == "1":  # fail here as an Apple GPU would (pocketlm/mps_rules.py)
            from pocketlm.mps_rules import MPSRules

            with MPSRules():
                return int(args.handler(args) or 0)
        return int(args.handler(args) or 0)
    except PocketLMError as e:
        sys.stderr.write(f"pocketlm: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("pocketlm: interrupted\n")
        return 130
