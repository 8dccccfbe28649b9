"""llama2.c's `run.c` as the CPU decode peer: built from its copy in the shared peers folder, run on
random fp32 weights of the v1 shape, timed beside pocketlm in the same process (bench/decode.py's `runc`).

The peer's folder (run.c, tokenizer.bin, write_weights.py; MIT, with its commit) is `$POCKETLM_LLAMA2C`
or `../shared/peers/llama2c` beside the repository. It is built once per folder into a cache directory
with `gcc -Ofast -fopenmp -march=native`, as its README says.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peer_dir() -> Path | None:
    d = Path(os.environ.get("POCKETLM_LLAMA2C", REPO.parent / "shared" / "peers" / "llama2c"))
    return d if (d / "run.c").is_file() else None


def build(work: Path) -> tuple[Path, Path, Path]:
    """(binary, v1 weights, tokenizer) under `work`, compiled and written on first use."""
    src = peer_dir()
    if src is None:
        raise FileNotFoundError("llama2.c's run.c not found: set POCKETLM_LLAMA2C to its folder")
    work.mkdir(parents=True, exist_ok=True)
    binary, weights, tok = work / "run", work / "v1.bin", work / "tokenizer.bin"
    if not binary.exists():
        subprocess.run(["gcc", "-Ofast", "-fopenmp", "-march=native", str(src / "run.c"), "-lm", "-o", str(binary)],
                       check=True)
    if not weights.exists():
        subprocess.run([sys.executable, str(src / "write_weights.py")], cwd=work, check=True)
    if not tok.exists():
        shutil.copy(src / "tokenizer.bin", tok)
    return binary, weights, tok


def decode_tok_s(binary: Path, weights: Path, tok: Path, steps: int, threads: int) -> float:
    """run.c's own 'achieved tok/s' for `steps` greedy positions from BOS (each position one forward)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([str(binary), str(weights), "-z", str(tok), "-t", "0", "-n", str(steps), "-i", ""],
                         capture_output=True, text=True, env=env, check=True)
    m = re.search(r"achieved tok/s:\s*([0-9.]+)", out.stdout + out.stderr)
    if m is None:
        raise RuntimeError(f"run.c printed no tok/s: {out.stderr[-300:]}")
    return float(m.group(1))
