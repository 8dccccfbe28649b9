"""primer: hand-written chat examples in JSON lines, by default the primer shipped with pocketlm.

Each line is either `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response",
"system"?}`; an optional `id` is kept. Conversations must be: an optional system turn, then user
and assistant turns alternating, starting with the user and ending with the assistant. A line that
breaks this is an error naming the file, line and field (or, with skip_bad=1, skipped and counted).
`path=FILE.jsonl` reads your own file instead of the shipped `primer.jsonl`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pocketlm.data.rows import Row, data_files, json_rows, reject
from pocketlm.data.sources import LoadContext

SHIPPED = Path(__file__).with_name("primer.jsonl")


def check_messages(messages: Any) -> str | None:
    """None when `messages` is a well-formed conversation, else what is wrong with it."""
    if not isinstance(messages, list) or not messages:
        return "is not a non-empty list of turns"
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"turn {i} has no text 'content'"
    start = 1 if messages[0].get("role") == "system" else 0
    for i, m in enumerate(messages[start:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != expected:
            return (f"turn {start + i + 1} has role {m.get('role')!r}, expected {expected!r} "
                    "(an optional system turn, then user and assistant alternating)")
    if messages[-1]["role"] != "assistant":
        return "ends without an assistant turn; it must end with the assistant's reply"
    return None


def to_messages(row: Row) -> tuple[Any, str]:
    """(turns, field name) from either line format; turns is None when the line has neither."""
    d = row.data
    if d.get("messages") is not None:
        return d["messages"], "messages"
    if d.get("prompt") is None and d.get("response") is None:
        return None, "has neither 'messages' nor 'prompt' and 'response'"
    turns = [{"role": "system", "content": d["system"]}] if d.get("system") else []
    turns += [{"role": "user", "content": d.get("prompt")}, {"role": "assistant", "content": d.get("response")}]
    return turns, "prompt/response"


def load(ctx: LoadContext) -> Iterator[dict[str, Any]]:
    path = ctx.opt_path() or SHIPPED
    for row in json_rows(ctx, data_files(path, (".jsonl",), None)):
        messages, field = to_messages(row)
        problem = field if messages is None else check_messages(messages)
        if messages is None or problem is not None:
            what = problem if messages is None else f"field {field!r} {problem}"
            reject(ctx, row.where(), what, "bad conversation")
            continue
        yield {"messages": [{"role": m["role"], "content": m["content"].strip()} for m in messages],
               "id": str(row.data.get("id") or f"{Path(row.origin).stem}-{row.index}")}
