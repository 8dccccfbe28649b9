"""dolly: databricks/databricks-dolly-15k (instruction, context, response, category) as chats.

Each row becomes one user turn and one assistant turn. When a row has a context (a passage the
instruction refers to), the user turn is the instruction, a blank line, then `Context:` and the
passage on the following lines; rows without context have the instruction alone. `category` is
kept in `meta` (null in the DOCX-rebuilt mirror).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pocketlm.data.rows import JSON_EXTS, Row, get_strs, hub_rows, json_rows, local_files
from pocketlm.data.sources import LoadContext


def user_turn(instruction: str, context: str) -> str:
    """The documented layout of a Dolly prompt: instruction, then the context passage if any."""
    instruction, context = instruction.strip(), context.strip()
    return f"{instruction}\n\nContext:\n{context}" if context else instruction


def load(ctx: LoadContext) -> Iterator[dict[str, Any]]:
    files = local_files(ctx, JSON_EXTS)
    rows: Iterator[Row] = (hub_rows(ctx, ctx.opt_str("split", "train") or "train") if files is None
                           else json_rows(ctx, files))
    for row in rows:
        fields = get_strs(ctx, row, ("instruction", "response"))
        if fields is None:
            continue
        instruction, response = fields
        # The hub and the mirror both use "" for "no context"; a null is read the same way.
        context = row.data.get("context") or ""
        if not instruction.strip() or not response.strip():
            ctx.stats.drop("empty instruction or response")
            continue
        yield {
            "messages": [{"role": "user", "content": user_turn(instruction, context)},
                         {"role": "assistant", "content": response.strip()}],
            "id": f"{Path(row.origin).stem}-{row.index}",
            "meta": {"category": row.data.get("category")},
        }
