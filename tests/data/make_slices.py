"""Cut the fixture slices in this folder from the full data mirror (run from the repository root):

    python tests/data/make_slices.py ../shared/data

Every slice is a run of whole lines copied byte for byte (encoding, BOM and line endings as in the
source), so the loaders see the real schema and the real file quirks. The Roam export is not cut
from the mirror: `roam/roam_fixture_graph.json` is written by hand (see README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (folder, file) -> what to keep; see README.md for why each slice looks the way it does.
FINEWEB_DOCS, FINEWEB_MAX_CHARS = 40, 2500
DOLLY_ROWS, DOLLY_MAX_BYTES = 160, 700
OASST1_TREES = ("33f4b2f8-c384-46e0-8bd1-0d795cc2da2b", "48d9d271-8bcd-4ea7-97b1-4aa0c90babff")


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write(rel: str, parts: list[bytes]) -> None:
    out = HERE / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(parts))


def fineweb(src: Path) -> list[bytes]:
    """The first short documents, in file order (short so a few hundred KB hold two dozen)."""
    keep = [x for x in lines(src) if len(json.loads(x)["text"]) <= FINEWEB_MAX_CHARS]
    return keep[:FINEWEB_DOCS]


def dolly(src: Path) -> list[bytes]:
    """The first ten rows as they are (two have prompts of 1-2 KB), then the next short rows in file order."""
    rows = lines(src)
    return rows[:10] + [x for x in rows[10:] if len(x) <= DOLLY_MAX_BYTES][:DOLLY_ROWS - 10]


def oasst1(src: Path) -> list[bytes]:
    """Two whole message trees: deleted messages, messages that failed review, and (by the hash of its
    last message id) one thread in the validation split."""
    return [x for x in lines(src) if json.loads(x)["message_tree_id"] in OASST1_TREES]


def around(rows: list[bytes], head: int, tail_from: int, tail_to: int | None = None) -> list[bytes]:
    return rows[:head] + rows[tail_from:tail_to]


def main(data: Path) -> None:
    write("fineweb_legal/fineweb_legal_pilot_shared.jsonl",
          fineweb(data / "fineweb_legal" / "fineweb_legal_pilot_shared.jsonl"))
    (HERE / "fineweb_edu").mkdir(exist_ok=True)  # empty, as in the mirror: fineweb_edu falls back
    write("dolly/dolly_15k_from_docx.jsonl", dolly(data / "dolly" / "dolly_15k_from_docx.jsonl"))
    write("oasst1/oasst1_validation_en.jsonl", oasst1(data / "oasst1" / "oasst1_validation_en.jsonl"))
    # Tom Sawyer (UTF-8, BOM, START/END marker lines): the opening chapter and the book's last lines.
    tom = lines(data / "gutenberg" / "74-0.txt")
    write("gutenberg/74-0.txt", around(tom, 800, len(tom) - 60))
    # Pride and Prejudice (Windows-1252, CRLF, PG header and licence): header, START, the opening
    # chapters; the book's last lines, END, and the start and end of the licence.
    pp = lines(data / "gutenberg" / "pg1342.txt")
    end = next(i for i, x in enumerate(pp) if b"*** END OF" in x)
    write("gutenberg/pg1342.txt", around(pp, 330, end - 40, end + 80) + pp[-12:])
    # WikiText-2 raw test (CRLF, no blank lines): the first two articles.
    wiki = lines(data / "wikitext" / "wiki.test.raw")
    titles = [i for i, x in enumerate(wiki) if x.startswith(b" = ") and not x.startswith(b" = = ")]
    write("wikitext/wiki.test.raw", wiki[:titles[2]])
    # The tokenized (<unk>) validation split: its first article.
    valid = lines(data / "wikitext" / "wikitext-2-tokenized" / "valid.txt")
    write("wikitext/wikitext-2-tokenized/valid.txt", valid[:47])
    write("tinyshakespeare/input.txt", lines(data / "tinyshakespeare" / "input.txt")[:260])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
