"""embedded: English text that ships with the installed Python, for training with no download.

The documents are the docstrings of the standard library (module, class and function docstrings
found with `ast.get_docstring`, in sorted file order and source order, tests and site-packages left
out), grouped per module into documents of about `chars` characters (default 4000), then the
licence text of the Python distribution. The output depends only on the Python version.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from pathlib import Path
from typing import Any, Iterator

from pocketlm.data.gutenberg import split_paragraphs
from pocketlm.data.sources import LoadContext

# Test suites are mostly code-like fixtures; site-packages is whatever the user installed.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MIN_DOCSTRING = 40  # shorter ones ("Return self.") teach little English


def stdlib_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for the module and its classes and functions, in source order."""
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc
    stack: list[tuple[str, ast.AST]] = [(module, n) for n in reversed(tree.body)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield name, doc
            stack.extend((name, n) for n in reversed(node.body))


def load(ctx: LoadContext) -> Iterator[dict[str, Any]]:
    chars = ctx.opt_int("chars", 4000) or 4000
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(root):
        module = module_name(root, path)
        try:
            with warnings.catch_warnings():  # old escape sequences in some files warn on newer Pythons
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            # The stdlib ships a few deliberately broken files (e.g. lib2to3 fixtures).
            ctx.stats.drop("stdlib file that does not parse")
            continue
        paragraphs = []
        for name, doc in docstrings(tree, module):
            if len(doc) < MIN_DOCSTRING:
                ctx.stats.note(f"docstring shorter than {MIN_DOCSTRING} characters (skipped)")
                continue
            paragraphs.append(f"{name}\n{doc}")
        for i, piece in enumerate(split_paragraphs("\n\n".join(paragraphs), chars)):
            yield {"text": piece, "id": f"stdlib/{module}-{i}", "meta": {"module": module}}
    licence = root / "LICENSE.txt"
    if licence.is_file():
        for i, piece in enumerate(split_paragraphs(licence.read_text(encoding="utf-8"), chars)):
            yield {"text": piece, "id": f"LICENSE-{i}"}
