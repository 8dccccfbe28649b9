"""Batches from a real token cache: shapes, targets, positions, packing isolation, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.cache.build_cache import build_cache
from pocketlm.cache.dataset import PretrainData, SFTData
from pocketlm.cache.shards import Cache

T = 64


@pytest.fixture(scope="module")
def cache(tmp_path_factory, small_tokenizer, shared_data):
    out = tmp_path_factory.mktemp("cache")
    build_cache(small_tokenizer.path, [("fineweb_edu:take=30", "pretrain"), ("wikitext:take=400", "pretrain"),
                                       ("dolly:take=120", "sft"), ("oasst1:take=30", "sft")],
                out, seed=11, data_dir=shared_data, val_fraction=0.15, workers=2, progress=False)
    return out


def test_pretrain_batch(cache, small_tokenizer):
    tok = small_tokenizer
    data = PretrainData(cache, {"fineweb_edu": 3, "wikitext": 1}, T, seed=5, tokenizer_hash=tok.hash)
    assert data.mixture == {"fineweb_edu": 0.75, "wikitext": 0.25}
    b = data.batch(0, 8)
    for k in ("x", "y", "positions", "doc_ids"):
        assert b[k].shape == (8, T) and b[k].dtype == torch.int64
    assert torch.equal(b["x"][:, 1:], b["y"][:, :-1]) and (b["y"] >= 0).all()
    assert len(b["sources"]) == 8 and set(b["sources"]) <= {"fineweb_edu", "wikitext"}
    for i in range(8):
        x = b["x"][i]
        for t in range(1, T):  # a new document (position 0, next id) starts right after each <|eot|>
            restart = x[t - 1] == tok.eot_id
            assert (b["positions"][i, t] == 0) == bool(restart)
            assert b["doc_ids"][i, t] == b["doc_ids"][i, t - 1] + int(restart)
    # Each row is a real window of its source's token stream.
    c = Cache(cache)
    stream_ids = {n: c.stream(n, "train").read(0, c.stream(n, "train").n_tokens) for n in data.mixture}
    for i, name in enumerate(b["sources"]):
        ids = stream_ids[name]
        assert (np.lib.stride_tricks.sliding_window_view(ids, T) == b["x"][i].numpy()).all(1).any()


def test_batch_is_a_pure_function_of_seed_step_rank(cache):
    a = PretrainData(cache, {"fineweb_edu": 1.0}, T, seed=5)
    b = PretrainData(cache, {"fineweb_edu": 1.0}, T, seed=5)
    assert torch.equal(a.batch(7, 4)["x"], b.batch(7, 4)["x"])
    assert torch.equal(a.batch(7, 4, rank=1, world=2)["x"], b.batch(7, 4, rank=1, world=2)["x"])
    assert not torch.equal(a.batch(7, 4)["x"], a.batch(8, 4)["x"])
    assert not torch.equal(a.batch(7, 4)["x"], a.batch(7, 4, rank=1, world=2)["x"])
    assert not torch.equal(a.batch(7, 4)["x"], PretrainData(cache, {"fineweb_edu": 1.0}, T, seed=6).batch(7, 4)["x"])
    assert PretrainData(cache, {"fineweb_edu": 1.0}, T).seed == 11  # the cache's seed by default
    with pytest.raises(PocketLMError, match="rank 2 is outside world size 2"):
        a.batch(0, 4, rank=2, world=2)


def test_default_mixture_renormalizes_without_roam(cache):
    with pytest.warns(UserWarning, match="roam are absent or too small"):
        data = PretrainData(cache, None, T)
    assert data.mixture == {"fineweb_edu": 1.0}
    with pytest.raises(PocketLMError, match="none of the pretrain \\(train\\) sources \\['dolly'\\] is usable"):
        PretrainData(cache, {"dolly": 1.0}, T)


def test_pretrain_val_batches_cover_the_val_streams(cache):
    data = PretrainData(cache, {"fineweb_edu": 1, "wikitext": 1}, T, split="val")
    batches = list(data.val_batches(16))
    c = Cache(cache)
    n_windows = sum((c.stream(n, "val").n_tokens - 1) // T for n in ("fineweb_edu", "wikitext"))
    assert sum(len(b["sources"]) for b in batches) == n_windows
    again = list(PretrainData(cache, {"fineweb_edu": 1, "wikitext": 1}, T, seed=99, split="val").val_batches(16, 2))
    assert len(again) == 2 and all(torch.equal(p["x"], q["x"]) for p, q in zip(batches, again))
    assert set(batches[0]["sources"]) == {"fineweb_edu", "wikitext"}  # sources interleaved


def _naive_mask(lengths: list[int], t: int) -> np.ndarray:
    mask = np.zeros((t, t), dtype=bool)
    lo = 0
    for n in lengths + [t - sum(lengths)]:
        for i in range(lo, lo + n):
            for j in range(lo, i + 1):
                mask[i, j] = True
        lo += n
    return mask


def test_sft_rows_isolate_conversations(cache, small_tokenizer):
    tok = small_tokenizer
    with pytest.warns(UserWarning, match="prompt alone exceeds block_size 256"):
        data = SFTData(cache, ["dolly", "oasst1"], 256, seed=1)
    b = data.batch(3, 6)
    assert b["x"].shape == (6, 256) and set(b["sources"]) <= {"dolly", "oasst1"}
    for i in range(6):
        doc_ids, x, y = b["doc_ids"][i].numpy(), b["x"][i].numpy(), b["y"][i].numpy()
        lengths = [int((doc_ids == d).sum()) for d in range(doc_ids.max() + 1)]
        if (y[doc_ids == doc_ids.max()] == -100).all():  # padding: the last id, with no targets
            lengths.pop()
        allowed = (doc_ids[:, None] == doc_ids[None, :]) & np.tril(np.ones((256, 256), dtype=bool))
        assert np.array_equal(allowed, _naive_mask(lengths, 256))
        at = 0
        for n in lengths:
            assert b["positions"][i, at:at + n].tolist() == list(range(n))
            assert x[at] == tok.usr_id or x[at] == tok.sys_id  # each conversation starts at its first turn
            assert y[at + n - 1] == -100 and (y[at:at + n - 1] != -100).any()
            at += n
        assert (y[at:] == -100).all() and (x[at:] == tok.eot_id).all()
    assert torch.equal(b["x"], data.batch(3, 6)["x"])
    assert not torch.equal(b["x"], data.batch(4, 6)["x"])


def test_sft_long_conversations_are_cut_inside_an_answer(cache, small_tokenizer):
    with pytest.warns(UserWarning, match="prompt alone exceeds block_size 48"):
        data = SFTData(cache, {"dolly": 1.0}, 48, seed=0)
    assert data.dropped["dolly"] > 0  # prompts longer than 48 tokens cannot be kept
    cut = 0
    for b in data.val_batches(8):
        for y, doc_ids in zip(b["y"].numpy(), b["doc_ids"].numpy()):
            for d in range(doc_ids.max() + 1):
                ys = y[doc_ids == d]
                if (ys == -100).all():
                    continue  # padding
                # The conversation's last kept token is supervised: the target before it is not -100.
                assert ys[-1] == -100 and ys[-2] != -100
                cut += len(ys) == 48
    assert cut > 0


def test_sft_val_batches_visit_every_row_once(cache):
    with pytest.warns(UserWarning, match="exceeds block_size 128"):
        data = SFTData(cache, None, 128, split="val")
    assert set(data.mixture) == {"dolly", "oasst1"} and data.mixture["dolly"] == 0.5
    batches = list(data.val_batches(4))
    total_rows = sum(data.n_rows(n) for n in data.mixture)
    assert sum(len(b["sources"]) for b in batches) == total_rows
    assert all(torch.equal(p["x"], q["x"]) for p, q in zip(batches, data.val_batches(4)))
    with pytest.raises(PocketLMError, match="fineweb_edu are pretrain sources"):
        SFTData(cache, ["fineweb_edu"], 128)
