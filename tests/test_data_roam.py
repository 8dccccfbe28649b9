"""The Roam loader on an export: outline, nested children, block references across pages, zip.

The export tests run on the hand-written fixture graph (tests/data/roam/) and, marked full_data, on the
real export of Roam's help graph.
"""

from __future__ import annotations

import json
import re
import zipfile

import pytest

from pocketlm import PocketLMError
from pocketlm.data.sources import SourceStats, open_source


# Pages with text, pages without, block references resolved, and the fewest whole-block references
# (in all / to another page) the cross-page check must find.
COUNTS = {"fixture": {"records": 3, "empty": 3, "resolved": 7, "checked": 3, "across": 2},
          "full": {"records": 167, "empty": 1096, "resolved": 268, "checked": 20, "across": 5}}


@pytest.fixture()
def export(data_set):
    (path,) = (data_set.path / "roam").glob("*.json")
    return data_set.name, path


@pytest.fixture()
def docs(export):
    stats = SourceStats()
    return {r["id"]: r for r in open_source(f"roam:path={export[1]}", stats=stats)}, stats


def _blocks(node, page_uid, depth=0):
    for b in node.get("children", []):
        yield b, page_uid, depth
        yield from _blocks(b, page_uid, depth + 1)


def test_counts_and_plain_text(export, docs):
    by_id, stats = docs
    want = COUNTS[export[0]]
    assert stats.records == len(by_id) == want["records"]
    assert stats.dropped == {"empty page": want["empty"]}
    assert stats.notes["block reference resolved"] == want["resolved"]
    for r in by_id.values():  # "[[" alone still occurs inside code blocks
        assert not re.search(r"\[\[[^\[\]\n]*\]\]|#\[\[|\(\([\w-]{9}\)\)", r["text"])


def test_nested_outline_of_the_fixture_graph(data_dir):
    stats = SourceStats()
    by_id = {r["id"]: r["text"] for r in open_source("roam", data_dir=data_dir, stats=stats)}
    # Both key styles (`refs` and `:block/refs`, `props` and `:block/props`) are in the file; only
    # `string`, `uid` and `children` make the text.
    assert by_id["pSourDgh1"] == (
        "Sourdough\n\n"
        "- Starter feeding::\n"
        "  - Feed 1:1:1 by weight: flour, water, starter\n"
        "  - Ready when it doubles in 4-6 hours; set the Kitchen Timer\n"
        "    - In winter it sits on top of the fridge warmth\n"
        "- Bake day\n"
        "  - TODO preheat the Dutch oven for 45 minutes\n"
        "  - Score the loaf at a shallow angle with a lame blade\n"
        "- Hydration is the share of water: Feed 1:1:1 by weight: flour, water, starter\n"
        "  - Starter feeding::")
    # References to another page, an alias, an embed macro, and a reference to a missing block.
    assert by_id["pKTimer01"] == (
        "Kitchen Timer\n\n"
        "- Used for: Ready when it doubles in 4-6 hours; set the Kitchen Timer\n"
        "- Feed 1:1:1 by weight: flour, water, starter\n"
        "- Keep the feeding ratio on the door\n"
        "- Bake day\n"
        "- An old note pointed at  here")
    # A daily-notes page: four levels deep, and a multi-line block aligned under its first line.
    assert by_id["12-01-2026"].endswith(
        "    - Next time: a longer bulk ferment\n"
        "      - Feed 1:1:1 by weight: flour, water, starter\n"
        "- Timer script:\n  ```python\n  print(\"bake\")\n  ```")
    assert stats.notes["block reference to a block not in the export (removed)"] == 1
    assert stats.notes["blocks in the pages given"] == 19


@pytest.mark.full_data
def test_nested_outline_of_the_real_export(shared_data):
    path = shared_data / "roam" / "roam_help_graph_2024-12-10.json"
    by_id = {r["id"]: r for r in open_source(f"roam:path={path}")}
    assert by_id["RA1UXmzp0"]["text"].startswith(
        "roam/css\n\n- #.rm-g\n  - From having a dark theme to opening multiple panels, with a few clicks")
    assert "\n- Community Videos::\n  - How to do color tagging in Roam by Zack Fan\n    - https://www.youtube" \
        in by_id["RA1UXmzp0"]["text"]


def test_block_references_resolve_across_pages(export, docs):
    by_id, _ = docs
    pages = json.loads(export[1].read_text(encoding="utf-8"))
    where = {b["uid"]: (b.get("string", ""), page["uid"]) for page in pages for b, _, _ in _blocks(page, page["uid"])}
    checked = across = 0
    for page in pages:
        for b, page_uid, depth in _blocks(page, page["uid"]):
            m = re.fullmatch(r"\(\(([\w-]+)\)\)", b.get("string", "").strip())
            if not m or m.group(1) not in where or re.search(r"[\[#({]", where[m.group(1)][0]):
                continue
            target, target_page = where[m.group(1)]
            assert f"\n{'  ' * depth}- {target.strip()}" in by_id[page_uid]["text"]
            checked += 1
            across += target_page != page_uid
    assert checked >= COUNTS[export[0]]["checked"] and across >= COUNTS[export[0]]["across"]


def test_markup_becomes_words(tmp_path):
    pages = [
        {"title": "Notes", "uid": "p1", "children": [
            {"string": "See [[Big Idea]] and #tag and #[[two words]]", "uid": "b1", "children": [
                {"string": "quote: ((b3))", "uid": "b2"}]},
            {"string": "{{[[TODO]]}} call [alias](((b3)))", "uid": "b4"}]},
        {"title": "Other", "uid": "p2", "children": [{"string": "the **source** text", "uid": "b3"}]},
        {"title": "Empty", "uid": "p3"},
    ]
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(pages))
    stats = SourceStats()
    recs = list(open_source(f"roam:path={path}", stats=stats))
    assert [r["text"] for r in recs] == [
        "Notes\n\n- See Big Idea and tag and two words\n  - quote: the **source** text\n- TODO call alias",
        "Other\n\n- the **source** text"]
    assert stats.dropped == {"empty page": 1}
    with zipfile.ZipFile(tmp_path / "export.zip", "w") as zf:
        zf.write(path, "graph.json")
    assert [r["text"] for r in open_source(f"roam:path={tmp_path / 'export.zip'}")] == [r["text"] for r in recs]


def test_non_roam_json_is_an_error(tmp_path):
    obj = tmp_path / "obj.json"
    obj.write_text('{"pages": []}')
    with pytest.raises(PocketLMError, match=r"obj.json: not a Roam export: the top level is a JSON dict"):
        list(open_source(f"roam:path={obj}"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"title": "a",\n "children": [}]')
    with pytest.raises(PocketLMError, match=r"broken.json line 2 column 15: not valid JSON"):
        list(open_source(f"roam:path={broken}"))
    untitled = tmp_path / "untitled.json"
    untitled.write_text('[{"title": "a", "children": [{"string": "x"}]}, {"string": "no title"}]')
    with pytest.raises(PocketLMError, match=r"untitled.json page 2: field 'title' is missing"):
        list(open_source(f"roam:path={untitled}"))
    stats = SourceStats()
    assert len(list(open_source(f"roam:path={untitled},skip_bad=1", stats=stats))) == 1
    assert stats.dropped == {"bad page: no 'title' field": 1}
    with pytest.raises(PocketLMError, match="roam reads your own export: use roam:path=EXPORT.json"):
        list(open_source("roam", data_dir=tmp_path))
