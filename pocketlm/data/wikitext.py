"""wikitext: WikiText raw (2 or 103) split into one document per article, for eval and smoke tests.

Hub: Salesforce/wikitext, config `name` (default wikitext-2-raw-v1), split `split` (default test),
one row per line. Local: DATA_DIR/wikitext/*.raw (or `path=`), read line by line the same way.
An article starts at a level-1 heading line ` = Title = `; ` = = Section = = ` lines stay inside
it. Lines keep WikiText's own tokenization (` @-@ ` etc.), as eval numbers on WikiText expect.
Blank lines (the hub's paragraph separators) are dropped; each remaining line is a paragraph.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from pocketlm.data.rows import Row, get_str, hub_rows, local_files, text_rows
from pocketlm.data.sources import LoadContext

TITLE = re.compile(r"^ ?= ([^=].*?) = ?$")
# The hub's split names -> the stems of WikiText's own files (wiki.train.raw, wiki.valid.raw,
# wiki.test.raw), so an article has the same id read from the hub or from a mirror of those files.
FILE_STEMS = {"train": "wiki.train", "validation": "wiki.valid", "test": "wiki.test"}


def articles(lines: Iterator[str]) -> Iterator[tuple[str | None, list[str]]]:
    """(title, paragraphs) per article; text before the first title comes first, titled None."""
    title: str | None = None
    body: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        match = TITLE.match(line)
        if match:
            if title is not None or body:
                yield title, body
            title, body = match.group(1).strip(), []
        elif line.strip():
            body.append(line.strip())
    if title is not None or body:
        yield title, body


def load(ctx: LoadContext) -> Iterator[dict[str, Any]]:
    split = ctx.opt_str("split", "test") or "test"
    files = local_files(ctx, (".raw",))
    rows: Iterator[Row] = (hub_rows(ctx, split, ctx.opt_str("name", "wikitext-2-raw-v1")) if files is None
                           else text_rows(files, by_document=False))
    stem = Path(files[0]).stem if files else FILE_STEMS.get(split, split)

    def lines() -> Iterator[str]:
        for row in rows:
            text = get_str(ctx, row, "text")
            if text is not None:
                yield text

    for i, (title, body) in enumerate(articles(lines())):
        if title is None:
            ctx.stats.drop("paragraph before the first article title", len(body))
            continue
        if not body:
            ctx.stats.drop("article with a title and no text")
            continue
        yield {"text": title + "\n\n" + "\n\n".join(body), "id": f"{stem}-{i}", "meta": {"title": title}}
