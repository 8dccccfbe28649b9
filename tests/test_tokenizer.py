"""Tokenizer: fixed special ids, lossless round trips on every real data folder (the fixture slices
and, marked full_data, the whole mirror) and on generated unicode, byte views of ids, deterministic
training, clear errors, and the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketlm import PocketLMError
from pocketlm.cli import main
from pocketlm.tokenizer.tokenizer_sp import REQUIRED_CHARS, SPECIAL_TOKENS, TRAIN_INFO_FILE, Tokenizer, train_tokenizer


def _jsonl(path: Path, limit: int | None = None) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(limit or 10**9), f)]


def _raw(path: Path, encoding: str = "utf-8") -> str:
    # newline="" keeps CRLF and the BOM as they are in the file: the tokenizer must keep them too.
    with path.open(encoding=encoding, newline="") as f:
        return f.read()


def _roam_strings(node: dict | list) -> list[str]:
    nodes = node if isinstance(node, list) else [node]
    out: list[str] = []
    for n in nodes:
        out += [n[k] for k in ("title", "string") if k in n]
        out += _roam_strings(n.get("children", []))
    return out


def _folder_texts(data: Path, folder: str) -> list[str]:
    if folder == "fineweb_legal":
        rows = _jsonl(data / folder / "fineweb_legal_pilot_shared.jsonl")
        return [r["text"] for r in (rows if len(rows) <= 300 else rows[:150] + rows[-150:])]
    if folder == "gutenberg":
        # The full PG files (pg*.txt) are Windows-1252, the others UTF-8.
        return [_raw(p, "cp1252" if p.name.startswith("pg") else "utf-8")
                for p in sorted((data / folder).glob("*.txt"))]
    if folder == "wikitext":
        return [_raw(data / folder / "wiki.test.raw"), _raw(data / folder / "wikitext-2-tokenized" / "valid.txt")]
    if folder == "oasst1":
        return [r["text"] for r in _jsonl(data / folder / "oasst1_validation_en.jsonl")]
    if folder == "dolly":
        return [r[k] for r in _jsonl(data / folder / "dolly_15k_from_docx.jsonl", 3000)
                for k in ("instruction", "context", "response")]
    if folder == "roam":
        (export,) = (data / folder).glob("*.json")
        return _roam_strings(json.loads(export.read_text("utf-8")))
    assert folder == "tinyshakespeare"
    return [_raw(data / folder / "input.txt")]


FOLDERS = ("fineweb_legal", "gutenberg", "wikitext", "oasst1", "dolly", "roam", "tinyshakespeare")
MIN_CHARS = {"fixture": 500, "full": 100_000}  # the least text each folder gives the round trip


def test_special_tokens_have_fixed_single_ids(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    assert tok.special_token_ids() == {"<|sys|>": 1, "<|usr|>": 2, "<|asst|>": 3, "<|eot|>": 4}
    assert (tok.sys_id, tok.usr_id, tok.asst_id, tok.eot_id) == (1, 2, 3, 4)
    assert tok.vocab_size == 2000
    for i, t in enumerate(SPECIAL_TOKENS, 1):
        assert tok.encode(t, allow_special=True) == [i]
    text = "Q<|usr|>hi<|eot|><|asst|>"
    ids = tok.encode(text, allow_special=True)
    assert [i for i in ids if i <= 4] == [2, 4, 3]
    assert tok.decode(ids) == text


def test_special_strings_in_text_are_plain_text(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    for text in ("<|eot|>", "say <|sys|><|usr|><|asst|><|eot|> now", "<|eot|<|eot|>|>", "<unk>"):
        ids = tok.encode(text)
        assert not {0, 1, 2, 3, 4} & set(ids)
        assert tok.decode(ids) == text


def test_stop_id_round_trips(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    assert tok.id_to_piece(tok.eot_id) == "<|eot|>"
    assert tok.decode([tok.eot_id]) == "<|eot|>"
    assert tok.encode(tok.decode([tok.eot_id]), allow_special=True) == [tok.eot_id]
    ids = tok.encode("The end.") + [tok.eot_id]
    assert tok.decode(ids) == "The end.<|eot|>"
    assert tok.decode(ids, skip_special=True) == "The end."


@pytest.mark.parametrize("folder", FOLDERS)
def test_round_trip_real_data(small_tokenizer: Tokenizer, data_set, folder: str) -> None:
    tok = small_tokenizer
    lengths = tok.token_byte_lengths()
    texts = _folder_texts(data_set.path, folder)
    assert len(texts) >= 1 and sum(map(len, texts)) > MIN_CHARS[data_set.name]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert min(ids, default=5) >= 5  # never <unk> or a control id for real text
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_round_trip_keeps_file_quirks(small_tokenizer: Tokenizer, data_dir: Path) -> None:
    tok = small_tokenizer
    tom = _raw(data_dir / "gutenberg" / "74-0.txt")
    wiki = _raw(data_dir / "wikitext" / "wiki.test.raw")
    austen = _raw(data_dir / "gutenberg" / "pg1342.txt", "cp1252")
    assert tom.startswith("\ufeff") and "\r\n" in wiki and "\r\n" in austen
    assert tok.decode(tok.encode(tom[:500])) == tom[:500]
    assert tok.decode(tok.encode(wiki[:500])) == wiki[:500]
    assert tok.decode(tok.encode(austen[:500])) == austen[:500]


_ALPHABET = st.sampled_from(list("ab Z\t\n\r  ") + ["😀", "👩‍👩‍👧", "世", "界", "日本", "é", "\u0301", "▁",
                                                    "\x00", "\ufeff", "<|eot|>", "<|", "|>", "<0x41>"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(_ALPHABET, max_size=40).map("".join),
                 st.text(st.characters(exclude_categories=("Cs",)), max_size=80)))
def test_round_trip_generated_unicode(small_tokenizer: Tokenizer, text: str) -> None:
    tok = small_tokenizer
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.id_to_bytes(i) for i in ids) == text.encode("utf-8")
    assert int(tok.token_byte_lengths()[ids].sum()) == len(text.encode("utf-8"))
    assert not {0, 1, 2, 3, 4} & set(ids)


def test_byte_views_of_ids(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (2000,) and lengths.dtype == np.int64
    assert lengths[:5].tolist() == [0, 0, 0, 0, 0]
    assert [tok.id_to_bytes(i) for i in range(5)] == [b""] * 5
    byte_ab = tok.encode("\u01c2")  # an unseen character: byte fallback gives its two UTF-8 bytes
    assert [tok.id_to_piece(i) for i in byte_ab] == ["<0xC7>", "<0x82>"]
    assert [tok.id_to_bytes(i) for i in byte_ab] == [b"\xc7", b"\x82"] and lengths[byte_ab].tolist() == [1, 1]
    # Printable ASCII and Latin-1 are pieces of their own, never only bytes (REQUIRED_CHARS).
    assert all(len(tok.encode(c)) == 1 and not tok.id_to_piece(tok.encode(c)[0]).startswith("<0x")
               for c in REQUIRED_CHARS)
    space = tok.encode(" ")
    assert [tok.id_to_piece(i) for i in space] == ["\u2581"] and tok.id_to_bytes(space[0]) == b" "
    the = tok.encode(" the")
    assert tok.id_to_piece(the[0]) == "\u2581the" and tok.id_to_bytes(the[0]) == b" the"
    assert all(lengths[i] == len(tok.id_to_bytes(i)) for i in range(tok.vocab_size))


def test_hash_and_path(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    assert tok.path.name == "tokenizer.model"
    assert tok.hash == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    assert Tokenizer.load(tok.path.parent).hash == tok.hash
    info = json.loads((tok.path.parent / TRAIN_INFO_FILE).read_text())
    assert info["sha256"] == tok.hash and info["seed"] == 0 and info["vocab_size"] == 2000


def _some_fineweb(data: Path, n: int) -> list[str]:
    return [r["text"] for r in _jsonl(data / "fineweb_legal" / "fineweb_legal_pilot_shared.jsonl", n)]


def test_training_is_deterministic(data_dir: Path, tmp_path: Path) -> None:
    docs = _some_fineweb(data_dir, 40)

    def train(name: str, seed: int) -> str:
        path = train_tokenizer(iter(docs), vocab_size=600, out_dir=tmp_path / name, seed=seed, max_sentences=30)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    first = train("a", 0)
    assert train("b", 0) == first
    info = json.loads((tmp_path / "a" / TRAIN_INFO_FILE).read_text())
    assert info["max_sentences"] == 30 and info["sampled"] == 30 < info["sentences"] and info["documents"] == 40
    assert train("c", 1) != first  # the seed picks which chunks are sampled


def test_training_errors(tmp_path: Path) -> None:
    with pytest.raises(PocketLMError, match="no text"):
        train_tokenizer(iter([]), vocab_size=600, out_dir=tmp_path)
    with pytest.raises(PocketLMError, match="must start with"):
        train_tokenizer(iter(["x"]), special_tokens=("<|eot|>",), out_dir=tmp_path)
    with pytest.raises(PocketLMError, match="corpus item 1 is bytes"):
        train_tokenizer(iter(["x", b"y"]), out_dir=tmp_path)
    with pytest.raises(PocketLMError, match="--vocab-size 5000 is too large for this text: it supports at most"):
        train_tokenizer(iter(["only a few words here"] * 5), vocab_size=5000, out_dir=tmp_path)


def test_load_errors(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(PocketLMError, match="not found"):
        Tokenizer.load(tmp_path / "missing")
    # A stock SentencePiece model (<s>/</s> at 1, 2; whitespace folding) is refused with a fix.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world, hello there"] * 50),
                                   model_prefix=str(tmp_path / "stock"), vocab_size=15, minloglevel=2)
    with pytest.raises(PocketLMError, match="not a pocketlm tokenizer.*retrain"):
        Tokenizer.load(tmp_path / "stock.model")
    # Right special ids, but the default normalization folds whitespace: refused as not lossless.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world, hello there"] * 50),
                                   model_prefix=str(tmp_path / "folding"), vocab_size=300, minloglevel=2,
                                   hard_vocab_limit=False, byte_fallback=True, bos_id=-1, eos_id=-1,
                                   control_symbols=list(SPECIAL_TOKENS))
    with pytest.raises(PocketLMError, match="not lossless"):
        Tokenizer.load(tmp_path / "folding.model")
    with pytest.raises(PocketLMError, match="outside this tokenizer's vocabulary"):
        small_tokenizer.decode([5, 2000])
    with pytest.raises(PocketLMError, match="outside"):
        small_tokenizer.decode([-100])


def test_cli_train_and_info(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in _some_fineweb(data_dir, 40)))
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--sources", str(docs), str(data_dir / "gutenberg" / "74-0.txt"),
               "--vocab-size", "800", "--out", str(out), "--seed", "3", "--holdout-every", "20"])
    text = capsys.readouterr().out
    assert rc == 0 and (out / "tokenizer.model").is_file()
    assert "vocab size:    800" in text and "<|eot|>=4" in text
    assert "held out:      2 texts of" in text and "bytes/token" in text
    info = json.loads((out / TRAIN_INFO_FILE).read_text())
    assert info["documents"] == 39 and info["seed"] == 3  # 38 FineWeb docs (2 of 40 held out) + Tom Sawyer
    assert main(["tokenizer", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"sha256:        {Tokenizer.load(out).hash}" in text
    assert "trained on:    39 documents" in text and "(cap 50000, seed 3)" in text


def test_cli_reads_data_source_specs(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"gutenberg:path={data_dir / 'gutenberg'}"  # a spec, though it holds a path
    rc = main(["tokenizer", "train", "--sources", spec, "dolly", "--data-dir", str(data_dir),
               "--vocab-size", "700", "--max-sentences", "100", "--holdout-every", "5", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0 and f"of {spec}," in text
    info = json.loads((tmp_path / TRAIN_INFO_FILE).read_text())
    assert info["sampled"] == 100 < info["sentences"]


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenizer", "train", "--sources", str(tmp_path / "nope.txt"), "--out", str(tmp_path)]) == 1
    assert "nope.txt: no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    assert main(["tokenizer", "train", "--sources", str(bad), "--out", str(tmp_path)]) == 1
    assert f"{bad}:2: record has neither" in capsys.readouterr().err
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "user"}]}\n')
    assert main(["tokenizer", "train", "--sources", str(chats), "--out", str(tmp_path)]) == 1
    assert f"{chats}:2: messages[0] has no string 'content'" in capsys.readouterr().err
