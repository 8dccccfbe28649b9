"""The source registry, the spec syntax, per-source stats and `open_source`.

A source is named by a spec string `name[:key=value,...]` (e.g. `oasst1:lang=en,branches=best`).
`open_source` turns a spec into an iterator of records: documents `{"text", "source", "id"}` or
chats `{"messages": [{"role", "content"}, ...], "source", "id"}`, plus optional `meta`.
Each loader module owns its own format quirks; this file owns only what is common to all of them.
It never tokenizes.
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pocketlm import PocketLMError

# Keys every source accepts; each source adds its own in SourceInfo.keys.
COMMON_KEYS = ("take", "path", "split", "skip_bad")
DATA_DIR_ENV = "POCKETLM_DATA_DIR"


@dataclass(frozen=True)
class SourceInfo:
    name: str
    kind: str  # "doc" | "chat"
    hub_id: str | None  # Hugging Face dataset id; None for sources that only read local files
    keys: tuple[str, ...]  # source-specific spec keys
    needs: str  # one line for `pocketlm data list`
    about: str


SOURCES: dict[str, SourceInfo] = {s.name: s for s in (
    SourceInfo("fineweb_edu", "doc", "HuggingFaceFW/fineweb-edu", ("name", "min_score", "mirror"),
               "hub (config sample-10BT) or DATA_DIR/fineweb_edu/, else DATA_DIR/fineweb_legal/",
               "educational web pages (FineWeb-Edu), streamed"),
    SourceInfo("dolly", "chat", "databricks/databricks-dolly-15k", (),
               "hub or DATA_DIR/dolly/*.jsonl", "15k human-written instruction/response pairs"),
    SourceInfo("oasst1", "chat", "OpenAssistant/oasst1", ("lang", "branches"),
               "hub or DATA_DIR/oasst1/*.jsonl", "OpenAssistant conversation trees as linear threads"),
    SourceInfo("gutenberg", "doc", "manu/project_gutenberg", ("chars",),
               "hub (split en) or DATA_DIR/gutenberg/*.txt or path=DIR|FILE", "public-domain books"),
    SourceInfo("wikitext", "doc", "Salesforce/wikitext", ("name",),
               "hub or DATA_DIR/wikitext/*.raw", "Wikipedia articles (WikiText raw), for eval and smoke tests"),
    SourceInfo("roam", "doc", None, (),
               "path=EXPORT.json|.zip or DATA_DIR/roam/", "your Roam Research graph, one document per page"),
    SourceInfo("primer", "chat", None, (),
               "nothing (ships with pocketlm); path=FILE.jsonl for your own", "hand-written chat examples"),
    SourceInfo("embedded", "doc", None, ("chars",),
               "nothing (reads the installed Python)", "docstrings and licence text of the Python stdlib"),
)}


@dataclass(frozen=True)
class SourceSpec:
    name: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}:{opts}" if opts else self.name


@dataclass
class SourceStats:
    """What a source gave and what it left out. Every dropped item is counted with its reason."""

    records: int = 0
    characters: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count of items left out
    notes: Counter = field(default_factory=Counter)  # counted facts that are not drops

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        if "text" in record:
            self.characters += len(record["text"])
        else:
            self.characters += sum(len(m["content"]) for m in record["messages"])

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def note(self, what: str, n: int = 1) -> None:
        self.notes[what] += n

    def summary(self, name: str) -> str:
        lines = [f"{name}: {self.records:,} records, {self.characters:,} characters"]
        lines += [f"  dropped {n:,}: {why}" for why, n in sorted(self.dropped.items())]
        lines += [f"  note {n:,}: {what}" for what, n in sorted(self.notes.items())]
        return "\n".join(lines)


@dataclass
class LoadContext:
    """What a loader gets: its parsed spec, where local data lives, and the stats to fill."""

    info: SourceInfo
    options: dict[str, str]
    data_dir: Path | None
    stats: SourceStats
    skip_bad: bool

    def opt_str(self, key: str, default: str | None) -> str | None:
        return self.options.get(key, default)

    def opt_int(self, key: str, default: int | None) -> int | None:
        if key not in self.options:
            return default
        value = self.options[key]
        if not value.lstrip("-").isdigit():
            raise PocketLMError(f"spec {self.info.name}: {key}={value!r} is not an integer; write e.g. {key}=1000")
        return int(value)

    def opt_bool(self, key: str) -> bool:
        value = self.options.get(key, "0").lower()
        if value not in ("0", "1", "true", "false", "yes", "no"):
            raise PocketLMError(f"spec {self.info.name}: {key}={value!r} is not a boolean; write {key}=1 or {key}=0")
        return value in ("1", "true", "yes")

    def opt_choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.options.get(key, default)
        if value not in choices:
            raise PocketLMError(f"spec {self.info.name}: {key}={value!r} is not one of {', '.join(choices)}")
        return value

    def opt_path(self) -> Path | None:
        """`path=` as given, with `~` expanded; a missing path is the user's error, named here."""
        if "path" not in self.options:
            return None
        p = Path(self.options["path"]).expanduser()
        if not p.exists():
            raise PocketLMError(f"spec {self.info.name}: path={p} does not exist; fix the path")
        return p

    def mirror(self, name: str | None = None) -> Path | None:
        """DATA_DIR/<name>/ if a data dir was given and that folder exists."""
        if self.data_dir is None:
            return None
        folder = self.data_dir / (name or self.info.name)
        return folder if folder.is_dir() else None


def parse_spec(spec: str) -> SourceSpec:
    """`name[:key=value,...]` -> SourceSpec; unknown names and keys are errors naming the valid ones."""
    name, _, rest = spec.strip().partition(":")
    if name not in SOURCES:
        raise PocketLMError(f"unknown data source {name!r} in spec {spec!r}; valid sources: {', '.join(SOURCES)}")
    valid = COMMON_KEYS + SOURCES[name].keys
    options: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise PocketLMError(f"spec {spec!r}: {item!r} is not key=value; write e.g. {name}:take=1000")
        if key not in valid:
            raise PocketLMError(f"spec {spec!r}: unknown key {key!r} for {name}; valid keys: {', '.join(valid)}")
        options[key] = value.strip()
    return SourceSpec(name, options)


def source_kind(name: str) -> str:
    """"doc" or "chat" for a source name (or a full spec)."""
    return SOURCES[parse_spec(name).name].kind


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local mirror root: the argument, else $POCKETLM_DATA_DIR, else None (use the hub)."""
    raw = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if raw is None:
        return None
    p = Path(raw).expanduser()
    if not p.is_dir():
        raise PocketLMError(f"data dir {p} is not a folder; pass an existing --data-dir or fix ${DATA_DIR_ENV}")
    return p


def open_source(spec: str | SourceSpec, data_dir: str | Path | None = None,
                stats: SourceStats | None = None) -> Iterator[dict[str, Any]]:
    """Records of one source, from the hub or a local mirror, counted into `stats`.

    Local mirrors live in DATA_DIR/<source>/ in the hub's schema (DATA_DIR = `data_dir` or
    $POCKETLM_DATA_DIR). Options are checked here, before anything is read.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    info = SOURCES[parsed.name]
    ctx = LoadContext(info=info, options=dict(parsed.options), data_dir=resolve_data_dir(data_dir),
                      stats=stats if stats is not None else SourceStats(), skip_bad=False)
    ctx.skip_bad = ctx.opt_bool("skip_bad")
    take = ctx.opt_int("take", None)
    if take is not None and take < 0:
        raise PocketLMError(f"spec {parsed}: take must be >= 0")
    loader = importlib.import_module(f"pocketlm.data.{info.name}").load
    return _counted(loader(ctx), ctx.stats, parsed.name, take)


def _counted(records: Iterator[dict[str, Any]], stats: SourceStats, name: str,
             take: int | None) -> Iterator[dict[str, Any]]:
    if take == 0:
        return
    n = 0
    for record in records:
        record["source"] = name
        stats.add(record)
        yield record
        n += 1
        if take is not None and n >= take:
            # Closing the loader stops a hub stream now instead of reading on to the end.
            records.close()  # type: ignore[attr-defined]
            return
