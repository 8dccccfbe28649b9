"""The five hub datasets pocketlm streams, laid out as their real repos are, built from tests/data.

`build_repos(data, root)` writes root/<owner>/<name>/ for each hub id of pocketlm/data/sources.py:
the repo's README.md with its `configs:` YAML (where the real card has one), and the data files
under the real paths, parquet written with pyarrow in the real column names and types (the cards'
`dataset_info` features). `build_mirror(data, root)` writes the same rows as a local mirror
(`--data-dir`), so the hub path and the mirror path can be compared on identical input.

Where the facts come from is in docs/DATA.md ("The hub path, tested on loopback").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FINEWEB = "HuggingFaceFW/fineweb-edu"
DOLLY = "databricks/databricks-dolly-15k"
OASST1 = "OpenAssistant/oasst1"
GUTENBERG = "manu/project_gutenberg"
WIKITEXT = "Salesforce/wikitext"

# The FineWeb-Edu columns (its card's dataset_info). The slice's rows are FineWeb sample-10BT pages
# with text/id/url; the columns the slice lacks are null in their real types.
FINEWEB_SCHEMA = pa.schema([("text", pa.string()), ("id", pa.string()), ("dump", pa.string()),
                            ("url", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
                            ("language_score", pa.float64()), ("token_count", pa.int64()),
                            ("score", pa.float64()), ("int_score", pa.int64())])
OASST1_SCHEMA = pa.schema([
    ("message_id", pa.string()), ("parent_id", pa.string()), ("user_id", pa.string()),
    ("created_date", pa.string()), ("text", pa.string()), ("role", pa.string()), ("lang", pa.string()),
    ("review_count", pa.int32()), ("review_result", pa.bool_()), ("deleted", pa.bool_()), ("rank", pa.int32()),
    ("synthetic", pa.bool_()), ("model_name", pa.string()),
    ("detoxify", pa.struct([(k, pa.float64()) for k in ("toxicity", "severe_toxicity", "obscene",
                                                         "identity_attack", "insult", "threat", "sexual_explicit")])),
    ("message_tree_id", pa.string()), ("tree_state", pa.string()),
    ("emojis", pa.struct([("name", pa.list_(pa.string())), ("count", pa.list_(pa.int32()))])),
    ("labels", pa.struct([("name", pa.list_(pa.string())), ("value", pa.list_(pa.float64())),
                          ("count", pa.list_(pa.int32()))])),
])
TEXT_SCHEMA = pa.schema([("text", pa.string())])
GUTENBERG_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])

# File names as on the hub (the parquet shards' names carry the datasets-convert hash on the hub).
FINEWEB_FILES = ("sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet")  # 20 rows each
DOLLY_FILE = "databricks-dolly-15k.jsonl"
OASST1_FILES = {"train": "data/train-00000-of-00001-b42a775f407cee45.parquet",
                "validation": "data/validation-00000-of-00001-134b8fd0c89408b6.parquet"}
GUTENBERG_FILE = "data/en-00000-of-00001.parquet"
WIKITEXT_FILE = "wikitext-2-raw-v1/test-00000-of-00001.parquet"


def _card(yaml: str, title: str) -> str:
    return f"---\n{yaml.strip()}\n---\n\n# {title}\n\nA loopback copy for pocketlm's tests, built from tests/data.\n"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fineweb_rows(data: Path) -> list[dict]:
    rows = _jsonl(data / "fineweb_legal" / "fineweb_legal_pilot_shared.jsonl")
    return [{name: r.get(name) if name in ("text", "id", "url") else None for name in FINEWEB_SCHEMA.names}
            for r in rows]


def gutenberg_rows(data: Path) -> list[dict]:
    """One row per book, `id` the file stem (the mirror's book id), `text` the decoded file as it is."""
    rows = []
    for f in sorted((data / "gutenberg").glob("*.txt")):
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("cp1252")
        rows.append({"id": f.stem, "text": text})
    return rows


def wikitext_rows(data: Path) -> list[dict]:
    """One row per line, with its newline, as the hub's wikitext parquet holds them (`" = Title = \\n"`)."""
    lines = (data / "wikitext" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    return [{"text": line + "\n"} for line in lines]


def _parquet(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def build_repos(data: Path, root: Path) -> Path:
    """Write the five repos under root; returns root."""
    fw = root / FINEWEB
    rows = fineweb_rows(data)
    for k, name in enumerate(FINEWEB_FILES):  # two files, so a stream can fail between them
        _parquet(rows[20 * k:20 * (k + 1)], FINEWEB_SCHEMA, fw / name)
    (fw / "README.md").write_text(_card("""
license: odc-by
configs:
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
""", "FineWeb-Edu"), encoding="utf-8")

    dolly = root / DOLLY
    dolly.mkdir(parents=True, exist_ok=True)
    # The hub's file is JSON lines: the slice's lines are served byte for byte.
    shutil.copyfile(data / "dolly" / "dolly_15k_from_docx.jsonl", dolly / DOLLY_FILE)
    (dolly / "README.md").write_text(_card("""
license: cc-by-sa-3.0
task_categories:
- question-answering
- summarization
language:
- en
size_categories:
- 10K<n<100K
""", "databricks-dolly-15k"), encoding="utf-8")

    oasst = root / OASST1
    validation = [{k: r.get(k) for k in OASST1_SCHEMA.names} for r in _jsonl(data / "oasst1" / "oasst1_validation_en.jsonl")]
    _parquet(validation, OASST1_SCHEMA, oasst / OASST1_FILES["validation"])
    _parquet([], OASST1_SCHEMA, oasst / OASST1_FILES["train"])  # the slice is validation rows only
    (oasst / "README.md").write_text(_card("""
license: apache-2.0
tags:
- human-feedback
pretty_name: OpenAssistant Conversations
""", "OpenAssistant Conversations Dataset (OASST1)"), encoding="utf-8")

    gut = root / GUTENBERG
    _parquet(gutenberg_rows(data), GUTENBERG_SCHEMA, gut / GUTENBERG_FILE)
    (gut / "README.md").write_text(_card("""
configs:
- config_name: default
  data_files:
  - split: en
    path: data/en-*
""", "Project Gutenberg"), encoding="utf-8")

    wiki = root / WIKITEXT
    _parquet(wikitext_rows(data), TEXT_SCHEMA, wiki / WIKITEXT_FILE)
    (wiki / "README.md").write_text(_card("""
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
""", "WikiText"), encoding="utf-8")
    return root


def build_mirror(data: Path, root: Path) -> Path:
    """The same rows as a local mirror for `--data-dir`, in the hub's file names where a name makes an id."""
    (root / "fineweb_edu").mkdir(parents=True, exist_ok=True)
    rows = fineweb_rows(data)
    for k, name in enumerate(FINEWEB_FILES):
        (root / "fineweb_edu" / Path(name).with_suffix(".jsonl").name).write_text(
            "".join(json.dumps(r) + "\n" for r in rows[20 * k:20 * (k + 1)]), encoding="utf-8")
    (root / "dolly").mkdir(exist_ok=True)
    shutil.copyfile(data / "dolly" / "dolly_15k_from_docx.jsonl", root / "dolly" / "databricks-dolly-15k.jsonl")
    shutil.copytree(data / "oasst1", root / "oasst1")
    shutil.copytree(data / "gutenberg", root / "gutenberg")
    (root / "wikitext").mkdir(exist_ok=True)
    shutil.copyfile(data / "wikitext" / "wiki.test.raw", root / "wikitext" / "wiki.test.raw")
    return root
