"""The stage order of docs/ARCHITECTURE.md holds for every import in pocketlm.

The layers are declared once, in pyproject.toml's [tool.importlinter]; import-linter checks every
import against them: module-level ones, those inside functions (the CLI's lazy imports) and those
under TYPE_CHECKING, directly or through a chain of other modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def test_imports_follow_the_stage_order():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
         "--no-cache", str(REPO / "pyproject.toml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"an import breaks the stage order (docs/ARCHITECTURE.md):\n{run.stdout}{run.stderr}"
    assert "1 kept, 0 broken" in run.stdout


def test_the_graph_sees_imports_inside_functions():
    # tokenizer/corpus.py reads data sources through an import inside a function: the contract above
    # means something only if such imports are in the graph it checks.
    graph = grimp.build_graph("pocketlm", cache_dir=None)
    assert graph.direct_import_exists(importer="pocketlm.tokenizer.corpus", imported="pocketlm.data.sources")
