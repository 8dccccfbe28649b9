"""roam: a Roam Research JSON export (the .json file or the export .zip), one document per page.

A page becomes its title, a blank line, and its blocks as an indented `- ` outline. Roam markup is
turned into plain words: `((uid))` block references become the referenced block's text (across
pages), `[[link]]`, `#tag` and `#[[multi word]]` become the words, `[alias](((uid)))` /
`[alias]([[page]])` become the alias and `{{macro: arg}}` its argument, braces and all
(`{{query: {and: [[A]] [[B]]}}}` -> `{and: A B}`). Pages with no block text are dropped (counted).

These are personal notes: nothing about their content is ever logged, only counts. Errors name the
file and the page/block position, never the text. The export is nested JSON that `datasets` cannot
stream, so it is read with the json module (hub sources stream through `rows`).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

from pocketlm import PocketLMError
from pocketlm.data.rows import json_message, local_files, not_utf8, reject
from pocketlm.data.sources import LoadContext

BLOCK_REF = re.compile(r"\(\(([\w-]+)\)\)")
ALIAS = re.compile(r"\[([^\]]*)\]\((?:\(\([\w-]+\)\)|\[\[[^\]]*\]\])\)")
MACRO_NAME = re.compile(r"(?:\[\[)?([^{}:\]]*)(?:\]\])?")  # `name` or `[[name]]`
TAG_LINK = re.compile(r"#\[\[([^\[\]]*)\]\]")
LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
TAG = re.compile(r"(?<![\w/#&])#([\w/-]+)")
MAX_REF_DEPTH = 5  # references can form cycles; deeper chains are cut


FIX = "pass the JSON export of a Roam graph (.json or .zip)"


def read_export(path: Path) -> list[tuple[str, Any]]:
    """(where, parsed JSON) for the .json file, or for each .json member of an export .zip."""
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = sorted(n for n in zf.namelist() if n.endswith(".json"))
                if not names:
                    raise PocketLMError(f"{path}: the zip holds no .json file; export the graph as JSON from Roam")
                return [(f"{path}!{n}", _parse(f"{path}!{n}", zf.read(n))) for n in names]
        except zipfile.BadZipFile:
            raise PocketLMError(f"{path}: not a zip file; {FIX}") from None
    return [(str(path), _parse(str(path), path.read_bytes()))]


def _parse(where: str, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise PocketLMError(f"{where}: {not_utf8(e)}; {FIX}") from None
    except json.JSONDecodeError as e:
        raise PocketLMError(f"{where} line {e.lineno} column {e.colno}: not valid JSON ({json_message(e)}); "
                            f"{FIX}") from None


def _macro_end(s: str, start: int) -> int | None:
    """The end of the `{{...}}` opening at `start`, its braces balanced; None when it never closes."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1 if s[i - 1] == "}" else None
    return None


def macros(s: str) -> str:
    """`{{name}}` -> name, `{{name: arg}}` -> arg (name as `[[name]]` too). The argument may hold
    braces of its own, e.g. a query `{{query: {and: [[A]] [[B]]}}}` -> `{and: [[A]] [[B]]}`, and
    macros of its own, converted the same way. Unbalanced braces are left as they are."""
    out, at = [], 0
    while (start := s.find("{{", at)) >= 0:
        end = _macro_end(s, start)
        name, colon, arg = s[start + 2:end - 2].partition(":") if end else ("", "", "")
        named = MACRO_NAME.fullmatch(name.strip())
        if end is None or named is None:  # not a macro here; one may start at the next brace
            out.append(s[at:start + 1])
            at = start + 1
            continue
        out += [s[at:start], macros(arg).strip() or named.group(1).strip()]
        at = end
    return "".join(out) + s[at:]


def _check_pages(ctx: LoadContext, where: str, data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise PocketLMError(f"{where}: not a Roam export: the top level is a JSON {type(data).__name__}, "
                            "expected an array of pages with 'title' and 'children'")
    pages = []
    for i, page in enumerate(data):
        if not isinstance(page, dict) or not isinstance(page.get("title"), str):
            reject(ctx, f"{where} page {i + 1}", "field 'title' is missing (not a Roam page)",
                   "bad page: no 'title' field")
        else:
            pages.append(page)
    return pages


def _blocks(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for child in node.get("children") or []:
        if isinstance(child, dict):
            yield child
            yield from _blocks(child)


class Resolver:
    """Block uid -> text over the whole export, and Roam markup -> plain words."""

    def __init__(self, ctx: LoadContext, pages: list[dict[str, Any]]):
        self.ctx = ctx
        self.text = {b["uid"]: b.get("string") or "" for p in pages for b in _blocks(p) if "uid" in b}

    def plain(self, s: str, depth: int = 0) -> str:
        s = ALIAS.sub(r"\1", s)
        s = BLOCK_REF.sub(lambda m: self._ref(m.group(1), depth), s)
        s = macros(s)
        s = TAG_LINK.sub(r"\1", s)
        while LINK.search(s):  # nested links [[a [[b]]]] unwrap from the inside out
            s = LINK.sub(r"\1", s)
        return TAG.sub(r"\1", s)

    def _ref(self, uid: str, depth: int) -> str:
        if uid not in self.text:
            self.ctx.stats.note("block reference to a block not in the export (removed)")
            return ""
        if depth >= MAX_REF_DEPTH:
            self.ctx.stats.note(f"block reference chain deeper than {MAX_REF_DEPTH} (cut)")
            return ""
        self.ctx.stats.note("block reference resolved")
        return self.plain(self.text[uid], depth + 1)


def outline(resolver: Resolver, node: dict[str, Any], depth: int = 0) -> list[str]:
    """Indented `- ` lines for the blocks under `node`; a block's extra lines align under its text."""
    lines: list[str] = []
    for child in node.get("children") or []:
        if not isinstance(child, dict):
            continue
        text = resolver.plain(child.get("string") or "").strip()
        pad = "  " * depth
        if text:
            first, *rest = text.split("\n")
            lines.append(f"{pad}- {first}")
            lines.extend(f"{pad}  {line}" for line in rest)
        lines.extend(outline(resolver, child, depth + 1 if text else depth))
    return lines


def load(ctx: LoadContext) -> Iterator[dict[str, Any]]:
    files = local_files(ctx, (".json", ".zip"))
    if files is None:
        raise PocketLMError("roam reads your own export: use roam:path=EXPORT.json (or the .zip), "
                            "or --data-dir DIR with the export in DIR/roam/")
    pages = [p for f in files for where, data in read_export(f) for p in _check_pages(ctx, where, data)]
    resolver = Resolver(ctx, pages)
    for i, page in enumerate(pages):
        body = outline(resolver, page)
        if not body:
            ctx.stats.drop("empty page")
            continue
        blocks = sum(1 for _ in _blocks(page))
        ctx.stats.note("blocks in the pages given", blocks)
        title = resolver.plain(page["title"]).strip()
        yield {"text": title + "\n\n" + "\n".join(body), "id": str(page.get("uid") or f"page-{i}"),
               "meta": {"blocks": blocks}}
