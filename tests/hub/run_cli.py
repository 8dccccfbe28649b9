"""Run several `pocketlm` commands in one fresh Python process, each as `pocketlm ARGS` would run.

    python tests/hub/run_cli.py OUT_DIR '[["data", "show", "dolly"], ...]'

Command k's stdout and stderr go to OUT_DIR/k.out and OUT_DIR/k.err (file descriptors 1 and 2, so
everything the libraries print lands there too) and its exit code to OUT_DIR/k.rc. One process for
several commands: the hub settings (HF_ENDPOINT, HF_HUB_OFFLINE, ...) are read from the environment
at import, as for a user, and the imports are paid once.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def main() -> None:
    out_dir, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
    from pocketlm.cli import main as pocketlm

    saved = os.dup(1), os.dup(2)
    for k, argv in enumerate(commands):
        with open(out_dir / f"{k}.out", "wb") as out, open(out_dir / f"{k}.err", "wb") as err:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
            try:
                rc = pocketlm(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # what a user would see: the traceback on stderr, exit 1
                traceback.print_exc()
                rc = 1
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        (out_dir / f"{k}.rc").write_text(str(rc))


if __name__ == "__main__":
    main()
