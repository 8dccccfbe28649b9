"""Bad input names file, line and field, or is skipped and counted with skip_bad; nothing vanishes."""

from __future__ import annotations

import json

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
