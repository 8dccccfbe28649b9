"""Bad input names file, line and field, or is skipped and counted with skip_bad; nothing vanishes."""

from __future__ import annotations

import json
import random
import re

import pytest

from pocketlm import PocketLMError
from pocketlm.cli import main
from pocketlm.data.sources import SourceStats, open_source


@pytest.fixture()
def dolly_lines(data_dir):
    with (data_dir / "dolly" / "dolly_15k_from_docx.jsonl").open(encoding="utf-8") as fh:
        return [next(fh) for _ in range(4)]


def _mirror(tmp_path, name, lines):
    (tmp_path / name).mkdir()
    path = tmp_path / name / "part.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_malformed_line_names_file_and_line(tmp_path, dolly_lines):
    path = _mirror(tmp_path, "dolly", dolly_lines[:2] + ['{"instruction": "x", \n'] + dolly_lines[2:])
    with pytest.raises(PocketLMError) as e:
        list(open_source("dolly", data_dir=tmp_path))
    assert str(e.value).startswith(f"{path} line 3: malformed JSON (")
    assert str(e.value).endswith("; fix it, or pass --skip-bad (spec key skip_bad=1) to skip and count it")
    stats = SourceStats()
    recs = list(open_source("dolly:skip_bad=1", data_dir=tmp_path, stats=stats))
    want = [json.loads(x)["response"] for x in dolly_lines]
    assert [r["messages"][1]["content"] for r in recs] == want
    assert stats.dropped == {"bad line: malformed JSON": 1}


def test_missing_field_names_the_field(tmp_path, dolly_lines):
    broken = json.loads(dolly_lines[1])
    del broken["response"]
    path = _mirror(tmp_path, "dolly", [dolly_lines[0], "\n", json.dumps(broken) + "\n", dolly_lines[2]])
    with pytest.raises(PocketLMError, match=rf"^{path} line 3: field 'response' is missing; fix it"):
        list(open_source("dolly", data_dir=tmp_path))
    stats = SourceStats()
    assert len(list(open_source("dolly:skip_bad=1", data_dir=tmp_path, stats=stats))) == 2
    assert stats.dropped == {"bad record: field 'response' missing or not a string": 1}


def test_wrong_type_and_not_an_object(tmp_path, dolly_lines):
    row = json.loads(dolly_lines[0])
    path = _mirror(tmp_path, "dolly", [dolly_lines[0], json.dumps({**row, "response": 42}) + "\n", "[1, 2]\n"])
    with pytest.raises(PocketLMError, match=rf"^{path} line 2: field 'response' is int, expected a string"):
        list(open_source("dolly", data_dir=tmp_path))
    stats = SourceStats()
    assert len(list(open_source("dolly:skip_bad=1", data_dir=tmp_path, stats=stats))) == 1
    assert stats.dropped == {"bad record: field 'response' missing or not a string": 1,
                             "bad line: not a JSON object": 1}


def test_primer_conversation_rules(tmp_path):
    lines = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
             {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
             {"prompt": "2+2?", "response": "4"},
             {"messages": [{"role": "user", "content": "only a question"}]},
             {"question": "no known fields"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(PocketLMError, match=rf"^{path} line 2: field 'messages' turn 2 has role 'user', "
                                            "expected 'assistant'"):
        list(open_source(f"primer:path={path}"))
    stats = SourceStats()
    recs = list(open_source(f"primer:path={path},skip_bad=1", stats=stats))
    assert [r["messages"][-1]["content"] for r in recs] == ["hello", "4"]
    assert stats.dropped == {"bad conversation": 3}
    path.write_text(json.dumps(lines[4]) + "\n")
    with pytest.raises(PocketLMError, match=r"line 1: has neither 'messages' nor 'prompt' and 'response'"):
        list(open_source(f"primer:path={path}"))


def test_cli_skip_bad_counts_on_stderr(tmp_path, dolly_lines, capsys):
    _mirror(tmp_path, "dolly", ["not json\n"] + dolly_lines[:2])
    assert main(["data", "show", "dolly", "--data-dir", str(tmp_path)]) == 1
    assert "line 1: malformed JSON" in capsys.readouterr().err
    assert main(["data", "show", "dolly", "--data-dir", str(tmp_path), "--skip-bad"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    assert "  dropped 1: bad line: malformed JSON" in err.splitlines()


def test_missing_paths_are_errors(tmp_path):
    with pytest.raises(PocketLMError, match="path=.*nope.jsonl does not exist; fix the path"):
        list(open_source(f"primer:path={tmp_path / 'nope.jsonl'}"))
    with pytest.raises(PocketLMError, match="is not a folder; pass an existing --data-dir"):
        list(open_source("dolly", data_dir=tmp_path / "missing"))
    (tmp_path / "gutenberg").mkdir()
    with pytest.raises(PocketLMError, match=r"gutenberg: no .txt files for gutenberg"):
        list(open_source("gutenberg", data_dir=tmp_path))


# Held-out files: each of these once ended in a Python traceback instead of a one-line error.

DOLLY_ROWS = [{"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "open_qa"},
              {"instruction": "What is 2 + 2?", "context": "", "response": "4", "category": "open_qa"}]


def _one_line_error(argv, capsys) -> str:
    """The CLI's message for bad input: exit status 1 and a single `pocketlm: error:` line."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("pocketlm: error: ") and err.count("\n") == 1, err
    return err.removeprefix("pocketlm: error: ").rstrip("\n")


def test_empty_jsonl_in_a_source_folder(tmp_path, capsys):
    _mirror(tmp_path, "dolly", [json.dumps(r) + "\n" for r in DOLLY_ROWS])
    empty = tmp_path / "dolly" / "empty.jsonl"
    empty.write_text("")
    err = _one_line_error(["data", "show", "dolly", "--data-dir", str(tmp_path)], capsys)
    assert err.startswith(f"{empty}: the file holds no records; fix it, or pass --skip-bad")
    stats = SourceStats()
    recs = list(open_source("dolly:skip_bad=1", data_dir=tmp_path, stats=stats))
    assert [r["messages"][1]["content"] for r in recs] == ["Red.", "4"]
    assert stats.dropped == {"bad file: no records": 1}


def test_jsonl_of_random_bytes(tmp_path, capsys):
    path = tmp_path / "dolly" / "part.jsonl"
    path.parent.mkdir()
    path.write_bytes(random.Random(0).randbytes(4096))
    err = _one_line_error(["data", "show", "dolly", "--data-dir", str(tmp_path)], capsys)
    assert re.fullmatch(rf"{re.escape(str(path))} line 1: not UTF-8 text \(byte 0x[0-9a-f]{{2}} at column \d+\); "
                        r"fix it, or pass --skip-bad .*", err), err
    # With skip_bad every line is dropped and counted once; nothing is given.
    stats = SourceStats()
    assert list(open_source("dolly:skip_bad=1", data_dir=tmp_path, stats=stats)) == []
    with path.open("rb") as f:  # JSON lines end at b"\n" only (a lone b"\r" is inside a line)
        lines = [x for x in f if not x.isspace()]
    assert stats.dropped["bad line: not UTF-8"] > 0
    assert sum(stats.dropped.values()) == len(lines)


def test_roam_export_of_random_bytes(tmp_path, capsys):
    noise = random.Random(1).randbytes(4096)
    export = tmp_path / "export.json"
    export.write_bytes(noise)
    err = _one_line_error(["data", "show", f"roam:path={export}"], capsys)
    assert re.fullmatch(rf"{re.escape(str(export))}: not UTF-8 text \(byte 0x[0-9a-f]{{2}} at offset \d+\); "
                        r"pass the JSON export of a Roam graph \(\.json or \.zip\)", err), err
    (tmp_path / "export.zip").write_bytes(noise)
    err = _one_line_error(["data", "show", f"roam:path={tmp_path / 'export.zip'}"], capsys)
    assert err == f"{tmp_path / 'export.zip'}: not a zip file; pass the JSON export of a Roam graph (.json or .zip)"


def test_skip_bad_counts_a_record_missing_several_fields_once(tmp_path):
    thread = [{"message_id": "q", "parent_id": None, "role": "prompter", "text": "Hi?", "lang": "en"},
              {"message_id": "a", "parent_id": "q", "role": "assistant", "text": "Hello.", "lang": "en"}]
    lacking = [{"role": "prompter", "lang": "en"}, {"lang": "en"}, {"role": "assistant", "rank": 0}]
    _mirror(tmp_path, "oasst1", [json.dumps(r) + "\n" for r in thread + lacking])
    stats = SourceStats()
    recs = list(open_source("oasst1:skip_bad=1", data_dir=tmp_path, stats=stats))
    assert [m["content"] for m in recs[0]["messages"]] == ["Hi?", "Hello."]
    assert stats.dropped == {"bad record: field 'message_id' missing or not a string": 3}


def test_roam_macro_with_nested_braces_is_converted_whole(tmp_path):
    page = {"title": "Queries", "uid": "p1", "children": [
        {"string": "both: {{query: {and: [[A]] [[B]]}}}", "uid": "b1"},
        {"string": "{{[[query]]: {and: [[A]] {not: {or: [[B]] [[C]]}}}}} and {{[[TODO]]}} done", "uid": "b2"}]}
    export = tmp_path / "export.json"
    export.write_text(json.dumps([page]))
    (doc,) = open_source(f"roam:path={export}")
    assert doc["text"] == "Queries\n\n- both: {and: A B}\n- {and: A {not: {or: B C}}} and TODO done"


def test_malformed_json_message_reads_once_at(tmp_path):
    # json's messages "Unterminated string starting at" and "Invalid control character at" end in "at".
    path = _mirror(tmp_path, "dolly", [json.dumps(DOLLY_ROWS[0]) + "\n", '{"instruction": "x'])
    with pytest.raises(PocketLMError) as e:
        list(open_source("dolly", data_dir=tmp_path))
    assert str(e.value).startswith(f"{path} line 2: malformed JSON (Unterminated string starting at column 17); ")
    path.write_text(json.dumps(DOLLY_ROWS[0]) + '\n{"instruction": "x\ty"}\n')
    with pytest.raises(PocketLMError) as e:
        list(open_source("dolly", data_dir=tmp_path))
    assert str(e.value).startswith(f"{path} line 2: malformed JSON (Invalid control character at column 19); ")
