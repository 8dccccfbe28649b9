"""Document sources on real data: fineweb_edu (via fineweb_legal), gutenberg, wikitext, embedded.

The loader tests run on the fixture slices and, marked full_data, on the whole mirror.
"""

from __future__ import annotations

import json
import re

import pytest

from pocketlm import PocketLMError
from pocketlm.data.sources import SourceStats, open_source

# Gutenberg paragraphs-documents, books and books that are not valid UTF-8 (the pg*.txt files).
GUTENBERG = {"fixture": {"records": 13, "books": {"74-0", "pg1342"}, "cp1252": 1},
             "full": {"records": 1481, "books": {"11-0", "1661-0", "174-0", "1952-0", "2542-0", "74-0", "pg1342",
                                                 "pg2701", "pg37106", "pg64317", "pg84"}, "cp1252": 5}}


def test_fineweb_edu_falls_back_to_fineweb_legal(data_set, capsys):
    recs = list(open_source("fineweb_edu:take=5", data_dir=data_set.path))
    err = capsys.readouterr().err
    assert err == (f"fineweb_edu: reading the local mirror {data_set.path / 'fineweb_legal'} "
                   "(fineweb_edu/ has no data files)\n")
    with (data_set.path / "fineweb_legal" / "fineweb_legal_pilot_shared.jsonl").open(encoding="utf-8") as fh:
        first = [json.loads(next(fh)) for _ in range(5)]
    assert [r["id"] for r in recs] == [r["id"] for r in first]
    assert [r["text"] for r in recs] == [r["text"] for r in first]
    assert recs[0]["meta"] == {"url": first[0]["url"], "score": first[0]["score"]}
    assert set(first[0]) > {"id", "text", "url", "score"}  # the other fields are left out of meta


def test_fineweb_edu_min_score_and_explicit_mirror(data_dir, capsys):
    stats = SourceStats()
    recs = list(open_source("fineweb_edu:mirror=fineweb_legal,min_score=4,take=10", data_dir=data_dir,
                            stats=stats))
    assert capsys.readouterr().err == ""  # an explicit mirror needs no note
    assert len(recs) == 10 and all(r["meta"]["score"] >= 4 for r in recs)
    assert sum(stats.dropped.values()) > 0 and list(stats.dropped) == ["score below min_score=4"]
    with pytest.raises(PocketLMError, match="no .jsonl/.json/.parquet files"):
        list(open_source("fineweb_edu:mirror=fineweb_edu", data_dir=data_dir))
    with pytest.raises(PocketLMError, match=r"mirror=nope needs a folder DATA_DIR/nope/"):
        list(open_source("fineweb_edu:mirror=nope", data_dir=data_dir))


def test_fineweb_edu_prefers_its_own_folder_and_notes_missing_scores(data_dir, tmp_path):
    src = data_dir / "fineweb_legal" / "fineweb_legal_pilot_shared.jsonl"
    with src.open(encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(6)]
    (tmp_path / "fineweb_edu").mkdir()
    edu = [{"text": r["text"], "id": r["id"], "url": r["url"], "int_score": i % 3 + 2} for i, r in enumerate(rows)]
    (tmp_path / "fineweb_edu" / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edu))
    recs = list(open_source("fineweb_edu:min_score=3", data_dir=tmp_path))
    assert [r["meta"]["int_score"] for r in recs] == [3, 4, 3, 4]
    (tmp_path / "fineweb_edu" / "part.jsonl").write_text(
        "".join(json.dumps({"text": r["text"], "id": r["id"]}) + "\n" for r in rows))
    stats = SourceStats()
    assert len(list(open_source("fineweb_edu:min_score=3", data_dir=tmp_path, stats=stats))) == 6
    assert stats.notes == {"min_score not applied: record has no int_score/score field": 6}


def test_gutenberg_strips_licence_and_splits_at_paragraphs(data_set):
    stats = SourceStats()
    recs = list(open_source("gutenberg", data_dir=data_set.path, stats=stats))
    want = GUTENBERG[data_set.name]
    assert stats.records == want["records"]
    assert stats.notes == {"book decoded as cp1252 (not valid UTF-8)": want["cp1252"]}
    assert {r["meta"]["book"] for r in recs} == want["books"]
    for r in recs:
        assert "\r" not in r["text"] and "\ufeff" not in r["text"] and "\ufffd" not in r["text"]
        assert "*** START OF" not in r["text"] and "*** END OF" not in r["text"]
        assert "Project Gutenberg License" not in r["text"]
        assert 0 < len(r["text"]) <= 4000 and r["text"] == r["text"].strip("\n")  # indentation kept
    by_id = {r["id"]: r["text"] for r in recs}
    assert "Reading Jane’s Letters" in by_id["pg1342-0"]  # Windows-1252 quote decoded
    assert by_id["74-0-0"].startswith("THE ADVENTURES OF TOM SAWYER")
    # The same book cut into smaller documents holds the same lines in the same order (a paragraph
    # longer than `chars` is cut at a line end).
    small = list(open_source("gutenberg:chars=1000,path=" + str(data_set.path / "gutenberg" / "74-0.txt")))
    big = [text for i, text in by_id.items() if i.startswith("74-0-")]
    assert len(small) > len(big) and all(len(r["text"]) <= 1000 for r in small)

    def lines(texts: list[str]) -> list[str]:
        return [line for t in texts for line in t.split("\n") if line]
    assert lines([r["text"] for r in small]) == lines(big)


WIKITEXT_ARTICLES = {"fixture": 2, "full": 62}


def test_wikitext_one_document_per_article(data_set):
    raw = (data_set.path / "wikitext" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    titles = [m.group(1) for m in (re.match(r"^ = ([^=].*) = $", x) for x in raw) if m]
    recs = list(open_source("wikitext", data_dir=data_set.path))
    assert len(recs) == len(titles) == WIKITEXT_ARTICLES[data_set.name]
    assert [r["meta"]["title"] for r in recs] == titles
    assert recs[0]["text"].startswith("Robert Boulter\n\nRobert Boulter is an English film , television")
    assert "\n\n= = Career = =\n\n" in recs[0]["text"]
    assert all("\r" not in r["text"] for r in recs)
    assert sum(len(r["text"].split("\n\n")) for r in recs) == len(raw)  # every line, once


def test_embedded_is_offline_and_deterministic():
    stats = SourceStats()
    first = list(open_source("embedded:take=6", stats=stats))
    again = list(open_source("embedded:take=6"))
    assert first == again
    assert first[0]["id"] == "stdlib/__future__-0"
    assert first[0]["text"].startswith("__future__\nRecord of phased-in incompatible language changes.")
    assert all(r["id"].startswith("stdlib/") and len(r["text"]) <= 4000 for r in first)
    assert stats.records == 6 and stats.characters > 6000
