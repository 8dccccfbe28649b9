"""Token cache build on real data: determinism, contents, integrity checks and crash safety."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pocketlm import PocketLMError
from pocketlm.cache.build_cache import build_cache, encode_records, val_split
from pocketlm.cache.shards import Cache, ShardWriter, token_dtype
from pocketlm.cli import main

SPECS = [("fineweb_edu:take=40", "pretrain"), ("wikitext:take=300", "eval"),
         ("dolly:take=150", "sft"), ("oasst1:take=30", "sft")]


def _build(out: Path, tok, data: Path, workers: int, shard_tokens: int = 20_000) -> dict:
    return build_cache(tok.path, SPECS, out, seed=3, data_dir=data, val_fraction=0.1, workers=workers,
                       shard_tokens=shard_tokens, progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, small_tokenizer, shared_data) -> Path:
    out = tmp_path_factory.mktemp("cache")
    _build(out, small_tokenizer, shared_data, workers=2)
    return out


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rebuild_is_byte_identical(cache, tmp_path, small_tokenizer, shared_data):
    # One worker instead of two, into another folder: the same bytes, meta.json included.
    _build(tmp_path, small_tokenizer, shared_data, workers=1)
    assert _tree(tmp_path) == _tree(cache)
    assert "meta.json" in _tree(cache) and len(_tree(cache)) > 10


def test_contents_match_meta(cache, small_tokenizer):
    c = Cache(cache, small_tokenizer.hash)
    meta = c.meta
    assert meta["dtype"] == "<u2" and c.vocab_size == 2000 and meta["seed"] == 3
    assert meta["tokenizer"]["sha256"] == small_tokenizer.hash
    assert set(meta["sources"]) == {"fineweb_edu", "wikitext", "dolly", "oasst1"}
    assert meta["sources"]["dolly"]["spec"] == "dolly:take=150"
    # Records each source gave (wiki.test.raw holds 62 articles); the cache's own drops would count here.
    given = {"fineweb_edu": 40, "wikitext": 62, "dolly": 150, "oasst1": 30}
    for name, src in meta["sources"].items():
        counts = src["counts"]
        assert counts["train"]["docs"] + counts["val"]["docs"] == given[name]
        assert not {"empty_text", "no_assistant_turn"} & set(src["dropped"])
        # An eval source is kept whole for validation; the others are split by document id.
        assert src["eval_only"] == (name == "wikitext")
        assert (counts["train"]["docs"] == 0) == (name == "wikitext")
        for split in ("train", "val"):
            if counts[split]["docs"] == 0:
                continue
            s = c.stream(name, split)
            ids = s.read(0, s.n_tokens)
            starts = s.doc_starts()
            assert s.n_tokens == counts[split]["tokens"] and len(starts) - 1 == counts[split]["docs"]
            assert ids.max() < c.vocab_size and ids.min() > 0
            # Every document ends with the boundary token and holds no other one (content never does).
            assert (ids[starts[1:] - 1] == c.eot_id).all()
            if src["kind"] == "pretrain":
                assert (ids == c.eot_id).sum() == counts[split]["docs"]
                assert c.token_bytes()[ids].sum() == counts[split]["text_bytes"]
    with pytest.raises(PocketLMError, match="no source 'roam' in this cache \\(it has dolly, fineweb_edu, oasst1, wikitext\\)"):
        c.stream("roam", "train")


def test_val_split_is_by_document_id(shared_data, small_tokenizer, cache):
    from pocketlm.data.sources import open_source

    ids = [r["id"] for r in open_source("dolly:take=150", data_dir=shared_data)]
    expected_val = sum(val_split("dolly", i, 0.1) == "val" for i in ids)
    assert Cache(cache).meta["sources"]["dolly"]["counts"]["val"]["docs"] == expected_val
    assert 0 < expected_val < 40
    # A larger val_fraction only adds documents to val: runs with different fractions stay nested.
    assert all(val_split("dolly", i, 0.3) == "val" for i in ids if val_split("dolly", i, 0.1) == "val")
    assert sum(val_split("dolly", i, 0.3) == "val" for i in ids) > expected_val


def test_sft_transcripts_have_supervised_assistant_spans(cache, small_tokenizer):
    c, tok = Cache(cache), small_tokenizer
    roles = (tok.sys_id, tok.usr_id, tok.asst_id)
    for name in ("dolly", "oasst1"):
        s = c.stream(name, "train")
        ids, mask, starts = s.read(0, s.n_tokens), s.read(0, s.n_tokens, mask=True), s.doc_starts()
        for a, b in zip(starts[:-1], starts[1:]):
            doc, m = ids[a:b], mask[a:b]
            first_asst = int(np.flatnonzero(doc == tok.asst_id)[0])
            assert not m[:first_asst + 1].any()  # everything up to and including the first <|asst|>
            role, answers = None, 0
            for t, supervised in zip(doc, m):
                if t in roles:
                    role = t
                    assert not supervised
                elif t == tok.eot_id:  # the closing <|eot|> is supervised exactly for assistant turns
                    assert supervised == (role == tok.asst_id)
                    answers += role == tok.asst_id
                else:
                    assert supervised == (role == tok.asst_id)
            assert answers >= 1


def test_chat_without_assistant_turn_is_dropped_and_counted(small_tokenizer):
    chats = [{"id": "a", "messages": [{"role": "user", "content": "Is anyone there?"}]},
             {"id": "b", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    out = encode_records(small_tokenizer, "sft", "dolly", 0.0, "assistant", chats)
    assert out[0] == "no_assistant_turn"
    assert out[1].split == "train" and out[1].text_bytes == 8
    assert small_tokenizer.decode(out[1].ids) == "<|usr|>Hi<|eot|><|asst|>Hello!<|eot|>"
    assert small_tokenizer.decode(out[1].ids[out[1].mask == 1]) == "Hello!<|eot|>"


def test_bulk_pretrain_encoding_matches_encode_document(small_tokenizer, encode_document):
    # The build encodes documents in bulk; each must get exactly encode_document's ids, including
    # the tokenizer's own rules: a literal U+2581 as its bytes, special strings as plain text.
    texts = ["Hello world", "\u2581", "a \u2581\u2581b\u2581", "<|eot|> is text <|usr|>", "",
             "caf\u00e9 \U0001F600\n\tx"]
    docs = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    out = encode_records(small_tokenizer, "pretrain", "fineweb_edu", 0.0, "assistant", docs)
    assert out[4] == "empty_text"
    for text, r in zip(texts, out):
        if text:
            assert r.ids.tolist() == encode_document(small_tokenizer, text)
            assert small_tokenizer.decode(r.ids[:-1]) == text
            assert r.text_bytes == len(text.encode("utf-8"))
    assert [small_tokenizer.id_to_bytes(int(i)) for i in out[1].ids[:-1]] == [b"\xe2", b"\x96", b"\x81"]


def test_dtype_follows_vocab(tmp_path):
    assert token_dtype(2000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    w = ShardWriter(tmp_path, "train", token_dtype(100_000), 10, False, iter(range(5)))
    w.add(np.array([70_000, 99_999, 4]), None)
    assert [p.name for p in tmp_path.iterdir()] == ["shard_00000.bin.tmp"]  # renamed only when complete
    w.close()
    assert np.fromfile(tmp_path / "shard_00000.bin", dtype="<u4").tolist() == [70_000, 99_999, 4]
    assert np.fromfile(tmp_path / "shard_00000.idx", dtype="<i8").tolist() == [0, 3]
    assert w.shards[0]["files"]["bin"]["size"] == 12


def _copy(cache: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(cache, dst)
    return dst


def test_truncated_shard_is_refused(cache, tmp_path):
    bad = _copy(cache, tmp_path)
    shard = bad / "fineweb_edu" / "shard_00000.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 2)
    for verify in ("sha256", "size"):
        with pytest.raises(PocketLMError, match=rf"shard_00000.bin is {size - 2} bytes, meta.json says {size} "
                                                r"\(truncated\?\); the cache is damaged: rebuild it"):
            Cache(bad, verify=verify)


def test_corrupt_shard_is_refused_unless_only_sizes_are_checked(cache, tmp_path):
    bad = _copy(cache, tmp_path)
    shard = bad / "dolly" / "shard_00000.mask"
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(PocketLMError, match="shard_00000.mask sha256 does not match meta.json"):
        Cache(bad)
    assert Cache(bad, verify="size").meta["sources"]["dolly"]["kind"] == "sft"


def test_other_tokenizer_is_refused(cache, tmp_path, small_tokenizer):
    other = tmp_path / "other.model"
    other.write_bytes(small_tokenizer.path.read_bytes() + b"\0")
    other_hash = hashlib.sha256(other.read_bytes()).hexdigest()
    with pytest.raises(PocketLMError, match=f"cache was built with tokenizer sha256 {small_tokenizer.hash[:12]}"):
        Cache(cache, tokenizer_hash=other_hash)


def test_missing_or_foreign_meta_is_refused(cache, tmp_path):
    bad = _copy(cache, tmp_path)
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(PocketLMError, match="format_version 99, this pocketlm reads 1"):
        Cache(bad)
    (bad / "meta.json").unlink()
    with pytest.raises(PocketLMError, match="not a finished token cache"):
        Cache(bad)


def test_killed_build_leaves_no_loadable_cache(cache, tmp_path, small_tokenizer, shared_data):
    out = _copy(cache, tmp_path)  # a complete cache that the killed rebuild overwrites
    code = (f"from pocketlm.cache.build_cache import build_cache\n"
            f"build_cache({str(small_tokenizer.path)!r}, [('fineweb_edu:take=500', 'pretrain')], {str(out)!r}, "
            f"data_dir={str(shared_data)!r}, workers=1, shard_tokens=5000, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.glob("*/*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]  # killed mid-build, not finished
    assert not (out / "meta.json").exists()  # the old cache's meta.json went before any shard was rewritten
    with pytest.raises(PocketLMError, match="not a finished token cache"):
        Cache(out)


def test_cli_info_and_bad_spec(cache, capsys, small_tokenizer, tmp_path):
    assert main(["cache", "info", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "dolly (sft, spec 'dolly:take=150')" in out and "<u2 ids, vocab 2000" in out
    args = ["cache", "build", "--tokenizer", str(small_tokenizer.path), "--out", str(tmp_path / "c")]
    assert main(args + ["--pretrain", "dolly:take=5"]) == 1
    assert "source 'dolly' holds chat records, not docs: pass it with --sft" in capsys.readouterr().err
