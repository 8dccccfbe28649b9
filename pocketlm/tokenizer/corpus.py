"""The text a tokenizer is trained on: documents of data sources or of files given by path.

A source is a data source spec (`dolly`, `gutenberg:...`, see `pocketlm.data.sources`) or a path: a
.txt file (one document), a folder of .txt files, or a .jsonl file of `{"text"}` documents or
`{"messages"}` chats. A path is recognised by a path separator before any ':' or, without a ':',
by a .txt/.jsonl suffix; so a folder in the current directory is written `./books`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pocketlm import PocketLMError
from pocketlm.data.rows import json_message, not_utf8


def _is_path(spec: str) -> bool:
    # Source specs may carry paths in their options (`gutenberg:path=/books`): look at the name only.
    name, colon, _ = spec.partition(":")
    return "/" in name or "\\" in name or (not colon and spec.endswith((".txt", ".jsonl")))


def _record_texts(rec: dict, where: str) -> Iterator[str]:
    """A document's text, or each message's content of a chat."""
    if isinstance(rec.get("text"), str):
        yield rec["text"]
    elif isinstance(rec.get("messages"), list):
        for i, m in enumerate(rec["messages"]):
            if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
                raise PocketLMError(f"{where}: messages[{i}] has no string 'content'; fix the record")
            yield m["content"]
    else:
        raise PocketLMError(f"{where}: record has neither a string 'text' nor a 'messages' list; "
                            "pass documents or chats")


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PocketLMError(f"{path}:{n}: invalid JSON ({json_message(e)} at column {e.colno}); "
                                    "fix or remove the line") from None
            if not isinstance(rec, dict):
                raise PocketLMError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}:{n}", rec


def _read_text(path: Path) -> str:
    # utf-8-sig drops a BOM and universal newlines turn CRLF into \n: file artefacts, not text.
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PocketLMError(f"{path}: {not_utf8(e)}; "
                            "convert it to UTF-8 or read it through its data source") from None


def source_documents(spec: str, data_dir: str | None) -> Iterator[list[str]]:
    """Each document of a source as its list of texts (one text, or a chat's message contents)."""
    if _is_path(spec):
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise PocketLMError(f"source folder {path} has no .txt files; pass a folder of .txt files")
            for f in files:
                yield [_read_text(f)]
        elif path.suffix == ".jsonl" and path.is_file():
            for where, rec in _jsonl_records(path):
                yield list(_record_texts(rec, where))
        elif path.is_file():
            yield [_read_text(path)]
        else:
            raise PocketLMError(f"source {spec}: no such file or folder; pass a .txt/.jsonl file, "
                                "a folder of .txt files, or a data source name")
        return
    from pocketlm.data.sources import open_source

    for n, rec in enumerate(open_source(spec, data_dir)):
        yield list(_record_texts(rec, f"source {spec} record {n}"))
