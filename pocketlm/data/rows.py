"""Rows from the Hugging Face hub or from local files, both through `datasets.load_dataset(streaming=True)`.

Only the location differs between the two: a hub id, or `data_files` in a local mirror. Streams are
never materialized. This module also owns bad-input handling: a bad line or field raises a
PocketLMError naming file and line, or, with `skip_bad=1`, is skipped and counted in the stats.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Iterator

from pocketlm import PocketLMError
from pocketlm.data.sources import LoadContext

JSON_EXTS = (".jsonl", ".json", ".parquet")
# Rows are taken from datasets in batches of this many: its own per-row iteration slices an arrow
# table and converts it for every row, which costs more CPU than parsing the JSON.
ROW_BATCH = 256
# From the hub, smaller batches: a row is given (and counted for a resume) only once its batch is
# converted, and a hub stream's rate is set by the network, not by this conversion.
HUB_ROW_BATCH = 16


@dataclass
class Row:
    data: dict[str, Any]
    origin: str  # a local file path or a hub id
    index: int  # 0-based row number within origin
    local: bool = False
    line: int | None = None  # 1-based line in a local file, when known

    def where(self) -> str:
        if not self.local:
            return f"{self.origin} row {self.index + 1}"
        return f"{self.origin} line {self.line}" if self.line is not None else self.origin


def json_message(e: json.JSONDecodeError) -> str:
    """json's message without the " at" some end in ("Unterminated string starting at"), which
    json's own str() completes with the position: callers add the position themselves."""
    return e.msg.removesuffix(" at")


def not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"


def reject(ctx: LoadContext, where: str, problem: str, reason: str) -> None:
    """Raise for bad input, or count it under `reason` when skip_bad is on."""
    if not ctx.skip_bad:
        raise PocketLMError(f"{where}: {problem}; fix it, or pass --skip-bad (spec key skip_bad=1) to skip and count it")
    ctx.stats.drop(reason)


def get_str(ctx: LoadContext, row: Row, name: str) -> str | None:
    """The string field `name` of a row, or None (rejected and counted) when missing or not a string."""
    value = row.data.get(name)
    if isinstance(value, str):
        return value
    problem = "is missing" if value is None else f"is {type(value).__name__}, expected a string"
    reject(ctx, row.where(), f"field {name!r} {problem}", f"bad record: field {name!r} missing or not a string")
    return None


def get_strs(ctx: LoadContext, row: Row, names: tuple[str, ...]) -> list[str] | None:
    """The string fields `names` of a row, or None when one is missing or not a string: the row is
    rejected (and counted) once, for the first such field."""
    values = []
    for name in names:
        value = get_str(ctx, row, name)
        if value is None:
            return None
        values.append(value)
    return values


def data_files(root: Path, exts: tuple[str, ...], split: str | None) -> list[Path]:
    """The data files under `root` (a file or a folder), sorted; `split=` keeps files whose name holds it."""
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.name.endswith(exts))
    if split is not None and root.is_dir():
        files = [p for p in files if split in p.name]
    return files


def local_files(ctx: LoadContext, exts: tuple[str, ...], mirror: str | None = None) -> list[Path] | None:
    """Files named by `path=` or found in DATA_DIR/<mirror>/; None when neither applies (use the hub)."""
    root = ctx.opt_path() or ctx.mirror(mirror)
    if root is None:
        return None
    split = ctx.opt_str("split", None)
    files = data_files(root, exts, split)
    if not files:
        which = f" whose name contains {split!r}" if split else ""
        raise PocketLMError(f"{root}: no {'/'.join(exts)} files{which} for {ctx.info.name}; "
                            "put the source's files there or fix path=/split=")
    return files


def _records(ds: Any, batch_size: int = ROW_BATCH) -> Iterator[dict[str, Any]]:
    """The rows of a streamed dataset as dicts, the same as iterating it, converted a batch at a time."""
    for batch in ds.with_format("python").iter(batch_size=batch_size):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def hub_rows(ctx: LoadContext, split: str, name: str | None = None) -> Iterator[Row]:
    """Stream a hub dataset: faults retried and resumed, failures one line (see `pocketlm.data.hub`)."""
    from pocketlm.data.hub import stream

    hub_id = ctx.info.hub_id
    assert hub_id is not None, f"{ctx.info.name} has no hub dataset"
    records = functools.partial(_records, batch_size=HUB_ROW_BATCH)
    for i, data in enumerate(stream(ctx.info.name, hub_id, split, name, records)):
        yield Row(data, hub_id, i)


def json_rows(ctx: LoadContext, files: list[Path]) -> Iterator[Row]:
    """Stream local JSON-lines / JSON / Parquet files in the hub schema, one file at a time.

    JSON lines are read by the stdlib, line by line: it gives every row its line number, and reading
    106 MB of FineWeb documents took 0.25 s of CPU against 0.43 s through datasets' JSON builder
    (bench/cache_build.py), time the token cache build spends on its main thread.
    """
    import datasets
    import pyarrow

    # datasets logs its own multi-line error before raising; the line-precise message below replaces it.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    for f in files:
        if f.suffix == ".jsonl":
            if not (yield from _json_lines(ctx, f)):
                reject(ctx, str(f), "the file holds no records", "bad file: no records")
            continue
        builder = "parquet" if f.suffix == ".parquet" else "json"
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f)], split="train", streaming=True)
        except StopIteration:  # the json builder reads a first record to guess the schema
            reject(ctx, str(f), "the file holds no records", "bad file: no records")
            continue
        n = 0
        try:
            for data in _records(ds):
                yield Row(data, str(f), n, local=True)
                n += 1
        except pyarrow.ArrowInvalid as e:
            raise PocketLMError(f"{f}: cannot be read as {builder} ({e}); fix or remove the file") from None


def _json_lines(ctx: LoadContext, path: Path) -> Generator[Row, None, int]:
    """The rows of a JSON-lines file; returns the number of non-blank lines."""
    good = lines = 0
    # Bytes, decoded line by line: a line that is not UTF-8 is found and reported (or skipped) without
    # ending the read of the others, and good lines cost one decode, no scan for bad bytes.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.isspace():
                continue
            lines += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8", "replace")) + 1
                reject(ctx, f"{path} line {lineno}", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                       f"{column})", "bad line: not UTF-8")
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                reject(ctx, f"{path} line {lineno}", f"malformed JSON ({json_message(e)} at column {e.colno})",
                       "bad line: malformed JSON")
                continue
            if not isinstance(data, dict):
                reject(ctx, f"{path} line {lineno}", f"expected a JSON object, got {type(data).__name__}",
                       "bad line: not a JSON object")
                continue
            yield Row(data, str(path), good, local=True, line=lineno)
            good += 1
    return lines


def text_rows(files: list[Path], by_document: bool, encoding: str = "utf-8-sig") -> Iterator[Row]:
    """Stream local text files: one row per line, or one per file. `utf-8-sig` drops a leading BOM."""
    import datasets

    for f in files:
        ds = datasets.load_dataset("text", data_files=[str(f)], split="train", streaming=True,
                                   sample_by="document" if by_document else "line", encoding=encoding)
        for i, data in enumerate(_records(ds)):
            yield Row(data, str(f), i, local=True, line=None if by_document else i + 1)
