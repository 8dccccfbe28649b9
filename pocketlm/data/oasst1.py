"""oasst1: OpenAssistant/oasst1 message trees as linear user/assistant threads.

The hub (and mirror) schema is a flat message table; trees are rebuilt from message_id/parent_id,
so the whole split is read before the first thread is given (the train split is ~85k short messages).
Keys: `lang` (default en; `all` keeps every language), `branches` (`best`: one thread per tree,
following the best-ranked reply at each step; `all`: one thread per root-to-leaf path).

A message is dropped, with its whole subtree, when it is in another language, deleted, failed
review, empty, has the same role as its parent, or hangs under a message that is not in the data.
Threads start with the user, alternate, and end on an assistant turn (a trailing user turn with
no reply is cut off). Every dropped message is counted with its reason.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

from pocketlm.data.rows import JSON_EXTS, Row, get_strs, hub_rows, json_rows, local_files, reject
from pocketlm.data.sources import LoadContext

ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class Message:
    id: str
    parent: str | None
    role: str  # "user" | "assistant"
    text: str
    rank: int | None
    created: str
    tree: str

    def order(self) -> tuple[int, int, str, str]:
        """Best first: ranked replies by rank (0 = best), then unranked ones, oldest first."""
        return (self.rank is None, self.rank or 0, self.created, self.id)


def _read(ctx: LoadContext, rows: Iterator[Row], lang: str) -> tuple[dict[str, Message], dict[str, str]]:
    """Kept messages by id, and the reason for each message removed by the filters."""
    kept: dict[str, Message] = {}
    removed: dict[str, str] = {}
    for row in rows:
        fields = get_strs(ctx, row, ("message_id", "role", "text"))
        if fields is None:
            continue
        mid, role, text = fields
        if role not in ROLES:
            reject(ctx, row.where(), f"field 'role' is {role!r}, expected 'prompter' or 'assistant'",
                   "bad record: unknown role")
            continue
        d = row.data
        if lang != "all" and d.get("lang") != lang:
            removed[mid] = f"language is not {lang}"
        elif d.get("deleted"):
            removed[mid] = "deleted"
        elif d.get("review_result") is False:
            removed[mid] = "failed review"
        elif not text.strip():
            removed[mid] = "empty text"
        else:
            kept[mid] = Message(mid, d.get("parent_id"), ROLES[role], text.strip(), d.get("rank"),
                                str(d.get("created_date") or ""), str(d.get("message_tree_id") or mid))
    return kept, removed


def _tree(ctx: LoadContext, kept: dict[str, Message], removed: dict[str, str]
          ) -> tuple[list[Message], dict[str, list[Message]], set[str]]:
    """Roots and alternating children; counts every kept message that no thread can reach."""
    for reason in removed.values():
        ctx.stats.drop(f"message: {reason}")
    roots = [m for m in kept.values() if m.parent is None and m.role == "user"]
    children: dict[str, list[Message]] = defaultdict(list)
    for m in kept.values():
        if m.parent in kept and kept[m.parent].role != m.role:
            children[m.parent].append(m)
    for kids in children.values():
        kids.sort(key=Message.order)
    reached: set[str] = set()
    stack = list(roots)
    while stack:
        m = stack.pop()
        reached.add(m.id)
        stack.extend(children[m.id])
    for m in kept.values():
        if m.id not in reached:
            ctx.stats.drop(f"message: {_why_unreached(m, kept, removed)}")
    return roots, children, reached


def _why_unreached(m: Message, kept: dict[str, Message], removed: dict[str, str]) -> str:
    while True:
        if m.parent is None:
            return "thread starts with an assistant message"
        if m.parent in removed:
            return "under a dropped message"
        if m.parent not in kept:
            return "orphan (parent not in the data)"
        parent = kept[m.parent]
        if parent.role == m.role:
            return "same role as its parent (would not alternate)"
        m = parent


def _best_path(root: Message, children: dict[str, list[Message]]) -> list[Message]:
    path, node = [root], root
    while True:
        kids = children[node.id]
        if node.role == "assistant":  # a follow-up prompt nobody answered cannot extend a thread
            kids = [k for k in kids if children[k.id]]
        if not kids:
            return path
        node = kids[0]
        path.append(node)


def _all_paths(root: Message, children: dict[str, list[Message]]) -> Iterator[list[Message]]:
    stack = [[root]]
    while stack:
        path = stack.pop()
        kids = children[path[-1].id]
        if not kids:
            yield path
        stack.extend(path + [k] for k in reversed(kids))


def _ends_on_assistant(path: list[Message]) -> list[Message]:
    while path and path[-1].role != "assistant":
        path = path[:-1]
    return path


def load(ctx: LoadContext) -> Iterator[dict[str, Any]]:
    lang = ctx.opt_str("lang", "en") or "en"
    branches = ctx.opt_choice("branches", "best", ("best", "all"))
    files = local_files(ctx, JSON_EXTS)
    rows = hub_rows(ctx, ctx.opt_str("split", "train") or "train") if files is None else json_rows(ctx, files)
    kept, removed = _read(ctx, rows, lang)
    roots, children, reached = _tree(ctx, kept, removed)
    used: set[str] = set()
    for root in roots:
        paths = [_best_path(root, children)] if branches == "best" else _all_paths(root, children)
        seen: set[tuple[str, ...]] = set()
        for path in map(_ends_on_assistant, paths):
            ids = tuple(m.id for m in path)
            if not path:
                ctx.stats.drop("thread: prompt without an assistant reply")
            elif ids not in seen:  # two unanswered follow-ups of one reply cut to the same thread
                seen.add(ids)
                used.update(ids)
                yield {"messages": [{"role": m.role, "content": m.text} for m in path], "id": path[-1].id,
                       "meta": {"tree_id": root.tree, "message_ids": list(ids)}}
    if len(reached) > len(used):
        ctx.stats.note(f"message: in no {branches} thread (another branch, or an unanswered prompt)",
                       len(reached) - len(used))
