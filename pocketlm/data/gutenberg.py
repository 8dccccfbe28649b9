"""gutenberg: public-domain books as documents of about `chars` characters (default 4000).

Local: a folder of plain-text books (DATA_DIR/gutenberg/ or `path=`, a folder or one .txt file).
Hub: manu/project_gutenberg (`id`, `text`; split `en`). Either way the Project Gutenberg licence
header and footer are cut at the `*** START OF` / `*** END OF` lines (which may be indented) when present, CRLF becomes LF,
a BOM is dropped, and the body is split at paragraph (blank-line) boundaries.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from pocketlm import PocketLMError
from pocketlm.data.rows import Row, get_str, hub_rows, local_files, text_rows
from pocketlm.data.sources import LoadContext

START = re.compile(r"^[ \t]*\*\*\*\s*START OF", re.IGNORECASE | re.MULTILINE)
END = re.compile(r"^[ \t]*\*\*\*\s*END OF", re.IGNORECASE | re.MULTILINE)
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def strip_boilerplate(text: str) -> str:
    """The book body: LF line ends, no BOM, nothing up to the START line or from the END line."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = START.search(text)
    if start is not None:
        newline = text.find("\n", start.end())
        text = text[newline + 1:] if newline != -1 else ""
    end = END.search(text)
    if end is not None:
        text = text[:end.start()]
    return text.strip()


def split_paragraphs(text: str, chars: int) -> list[str]:
    """Pieces of about `chars` characters made of whole paragraphs; a longer paragraph is cut at lines."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for para in _paragraph_units(text, chars):
        if current and size + len(para) > chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def _paragraph_units(text: str, chars: int) -> Iterator[str]:
    for para in PARAGRAPH_BREAK.split(text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= chars:
            yield para
            continue
        lines: list[str] = []
        for line in para.split("\n"):
            if lines and sum(len(x) + 1 for x in lines) + len(line) > chars:
                yield "\n".join(lines)
                lines = []
            lines.append(line)
        yield "\n".join(lines)


def file_encoding(ctx: LoadContext, path: Path) -> str:
    """UTF-8 when the file is valid UTF-8, else Windows-1252, the 8-bit encoding of older PG files."""
    data = path.read_bytes()
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if encoding != "utf-8-sig":
            ctx.stats.note(f"book decoded as {encoding} (not valid UTF-8)")
        return encoding
    raise PocketLMError(f"{path}: neither UTF-8 nor Windows-1252 text; convert the book to UTF-8")


def _local_rows(ctx: LoadContext, files: list[Path]) -> Iterator[Row]:
    for f in files:
        yield from text_rows([f], by_document=True, encoding=file_encoding(ctx, f))


def load(ctx: LoadContext) -> Iterator[dict[str, Any]]:
    chars = ctx.opt_int("chars", 4000) or 4000
    files = local_files(ctx, (".txt",))
    rows: Iterator[Row] = (hub_rows(ctx, ctx.opt_str("split", "en") or "en") if files is None
                           else _local_rows(ctx, files))
    for row in rows:
        text = get_str(ctx, row, "text")
        if text is None:
            continue
        book = str(row.data["id"]) if row.data.get("id") is not None else Path(row.origin).stem
        body = strip_boilerplate(text)
        if not body:
            ctx.stats.drop("book with no text between the START/END lines")
            continue
        for i, piece in enumerate(split_paragraphs(body, chars)):
            yield {"text": piece, "id": f"{book}-{i}", "meta": {"book": book}}
