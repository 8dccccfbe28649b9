"""fineweb_edu: HuggingFaceFW/fineweb-edu web pages as documents, streamed (never materialized).

Keys: `name` (hub config, default sample-10BT), `min_score` (keep pages whose `int_score`, else
`score`, is at least this), `mirror` (which DATA_DIR folder to read), plus the common keys.
Local mirror: DATA_DIR/fineweb_edu/ when it has data files, else DATA_DIR/fineweb_legal/ (real
FineWeb pages in the same text/id/url schema); the choice is said in one stderr line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

from pocketlm import PocketLMError
from pocketlm.data.rows import JSON_EXTS, Row, data_files, get_str, hub_rows, json_rows, local_files
from pocketlm.data.sources import DATA_DIR_ENV, LoadContext

# Tried in order when no mirror= is given; fineweb_legal stands in when no FineWeb-Edu copy exists.
MIRRORS = ("fineweb_edu", "fineweb_legal")
SCORE_FIELDS = ("int_score", "score")


def _mirror_files(ctx: LoadContext) -> list[Path] | None:
    name = ctx.options.get("mirror")
    if name is not None and ctx.mirror(name) is None:
        raise PocketLMError(f"spec fineweb_edu: mirror={name} needs a folder DATA_DIR/{name}/ "
                            f"(DATA_DIR from --data-dir or ${DATA_DIR_ENV}); there is none")
    if "mirror" in ctx.options or "path" in ctx.options:
        return local_files(ctx, JSON_EXTS, ctx.options.get("mirror"))
    for name in MIRRORS:
        folder = ctx.mirror(name)
        if folder is not None and data_files(folder, JSON_EXTS, None):
            sys.stderr.write(f"fineweb_edu: reading the local mirror {folder}"
                             f"{'' if name == MIRRORS[0] else f' ({MIRRORS[0]}/ has no data files)'}\n")
            return local_files(ctx, JSON_EXTS, name)
    return None


def load(ctx: LoadContext) -> Iterator[dict[str, Any]]:
    min_score = ctx.opt_int("min_score", None)
    files = _mirror_files(ctx)
    rows: Iterator[Row]
    if files is None:
        rows = hub_rows(ctx, ctx.opt_str("split", "train") or "train", ctx.opt_str("name", "sample-10BT"))
    else:
        rows = json_rows(ctx, files)
    for row in rows:
        text = get_str(ctx, row, "text")
        if text is None:
            continue
        doc_id = row.data.get("id") or f"{Path(row.origin).stem}-{row.index}"
        score_field = next((f for f in SCORE_FIELDS if row.data.get(f) is not None), None)
        if min_score is not None:
            if score_field is None:
                ctx.stats.note("min_score not applied: record has no int_score/score field")
            elif row.data[score_field] < min_score:
                ctx.stats.drop(f"{score_field} below min_score={min_score}")
                continue
        if not text.strip():
            ctx.stats.drop("empty text")
            continue
        meta = {k: row.data[k] for k in ("url", *SCORE_FIELDS) if row.data.get(k) is not None}
        yield {"text": text, "id": str(doc_id), "meta": meta}
