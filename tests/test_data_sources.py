"""Spec parsing, stats, the hub code path (pointed at local files) and the `pocketlm data` CLI."""

from __future__ import annotations

import dataclasses
import json
import datasets
import huggingface_hub.constants
import pytest

from pocketlm import PocketLMError
from pocketlm.cli import main
from pocketlm.data import sources
from pocketlm.data.sources import SourceSpec, SourceStats, open_source, parse_spec, source_kind


def test_parse_spec_keys_and_values():
    spec = parse_spec("oasst1:lang=en,branches=best")
    assert spec == SourceSpec("oasst1", {"lang": "en", "branches": "best"})
    assert str(spec) == "oasst1:lang=en,branches=best"
    assert parse_spec("roam:path=~/roam.json").options == {"path": "~/roam.json"}
    assert parse_spec("fineweb_edu:take=20000").options == {"take": "20000"}
    assert parse_spec("primer") == SourceSpec("primer", {})


@pytest.mark.parametrize("spec, words", [
    ("oasst1:colour=red", ["unknown key 'colour'", "valid keys: take, path, split, skip_bad, lang, branches"]),
    ("wikipedia", ["unknown data source 'wikipedia'", "fineweb_edu, dolly, oasst1"]),
    ("dolly:take", ["'take' is not key=value"]),
])
def test_parse_spec_errors_name_the_fix(spec, words):
    with pytest.raises(PocketLMError) as e:
        parse_spec(spec)
    for w in words:
        assert w in str(e.value)


def test_bad_option_values_are_errors():
    with pytest.raises(PocketLMError, match="take='ten' is not an integer"):
        open_source("primer:take=ten")
    with pytest.raises(PocketLMError, match="branches='some' is not one of best, all"):
        list(open_source("oasst1:branches=some,path=/"))


def test_source_kind():
    assert [source_kind(n) for n in ("fineweb_edu", "dolly", "oasst1", "gutenberg", "wikitext", "roam",
                                     "primer", "embedded")] == ["doc", "chat", "chat", "doc", "doc", "doc",
                                                                "chat", "doc"]
    assert source_kind("oasst1:lang=en") == "chat"


def test_take_and_stats_count_characters():
    stats = SourceStats()
    recs = list(open_source("primer:take=3", stats=stats))
    assert [r["id"] for r in recs] == ["primer-000", "primer-001", "primer-002"]
    assert all(r["source"] == "primer" for r in recs)
    assert stats.records == 3
    assert stats.characters == sum(len(m["content"]) for r in recs for m in r["messages"])
    assert stats.summary("primer").startswith(f"primer: 3 records, {stats.characters:,} characters")


def test_hub_path_pointed_at_local_files_matches_the_mirror(data_dir, monkeypatch):
    """The hub branch calls datasets.load_dataset(hub_id, ...); only the location is swapped here. The
    same rows come out of datasets' reader and the mirror's line reader."""
    calls = []
    real = datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append((path, kwargs.get("split"), kwargs.get("streaming")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    local = str(data_dir / "oasst1")
    monkeypatch.setitem(sources.SOURCES, "oasst1", dataclasses.replace(sources.SOURCES["oasst1"], hub_id=local))
    via_hub = list(open_source("oasst1:split=validation"))
    assert calls == [(local, "validation", True)]
    via_mirror = list(open_source("oasst1", data_dir=data_dir))
    assert len(calls) == 1  # a mirror's JSON lines are read by the stdlib, the hub's rows by datasets
    assert len(via_hub) == 2  # the fixture's two message trees
    assert [r["messages"] for r in via_hub] == [r["messages"] for r in via_mirror]


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(data_dir))
    rec = next(open_source("dolly:take=1"))
    assert rec["messages"][0]["content"].startswith("When did Virgin Australia start operating?")


def test_offline_hub_is_one_line_with_the_flag(monkeypatch, capsys):
    # Offline mode makes the real hub call fail at once instead of retrying DNS for ~20 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    assert main(["data", "show", "dolly"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("pocketlm: error: cannot reach the Hugging Face hub for dolly "
                               "(databricks/databricks-dolly-15k")
    assert "pass --data-dir DIR (or set POCKETLM_DATA_DIR) where DIR/dolly/ holds a local copy" in lines[0]


def test_cli_show_prints_json_lines_and_counts(data_dir, capsys):
    assert main(["data", "show", "oasst1:branches=all", "--data-dir", str(data_dir), "--take", "4"]) == 0
    out, err = capsys.readouterr()
    recs = [json.loads(line) for line in out.splitlines()]
    assert len(recs) == 4 and all(r["source"] == "oasst1" for r in recs)
    chars = sum(len(m["content"]) for r in recs for m in r["messages"])
    assert err.splitlines()[0] == f"oasst1:branches=all,take=4: 4 records, {chars:,} characters"
    assert "dropped 1: message: deleted" in err and "dropped 3: message: failed review" in err


def test_cli_list_names_every_source(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out[1:]] == [
        ["fineweb_edu", "doc"], ["dolly", "chat"], ["oasst1", "chat"], ["gutenberg", "doc"],
        ["wikitext", "doc"], ["roam", "doc"], ["primer", "chat"], ["embedded", "doc"]]


def test_cli_error_is_one_line(capsys):
    assert main(["data", "show", "dolly:colour=red"]) == 1
    assert capsys.readouterr().err == ("pocketlm: error: spec 'dolly:colour=red': unknown key 'colour' for dolly; "
                                       "valid keys: take, path, split, skip_bad\n")
