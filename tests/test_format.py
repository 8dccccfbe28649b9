"""Training formats on real chats and documents: loss labels, boundaries, packing, attention masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketlm import PocketLMError
from pocketlm.data.sources import open_source
from pocketlm.format import IGNORE_INDEX
from pocketlm.format.packing import best_fit_pack, pack_row, truncate_length
from pocketlm.format.pretrain import encode_documents, window_positions
from pocketlm.format.sft import encode_chat
from pocketlm.model.gpt_v1 import _attention_mask


@pytest.fixture(scope="module")
def chats(data_dir):
    """Real multi-turn oasst1 threads and single-turn dolly pairs."""
    return (list(open_source("oasst1:branches=all", data_dir=data_dir))
            + list(open_source("dolly:take=15", data_dir=data_dir)))


def _assistant_spans(ids: list[int], tok) -> list[tuple[int, int]]:
    """[start, end] of each assistant turn: the <|asst|> index and the index of its closing <|eot|>."""
    spans, start = [], None
    for i, t in enumerate(ids):
        if t == tok.asst_id:
            start = i
        elif t == tok.eot_id and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_assistant_mask_on_real_chats(chats, small_tokenizer):
    tok = small_tokenizer
    for chat in chats:
        ids, labels = encode_chat(tok, chat["messages"])
        spans = _assistant_spans(ids, tok)
        assert len(spans) == sum(m["role"] == "assistant" for m in chat["messages"]) >= 1
        supervised = {i for i, lab in enumerate(labels) if lab != IGNORE_INDEX}
        expected = {i for a, e in spans for i in range(a + 1, e + 1)}
        assert supervised == expected  # content and closing <|eot|> of every assistant turn, nothing else
        assert all(labels[i] == ids[i] for i in supervised)
        assert all(labels[i] == IGNORE_INDEX for i in range(spans[0][0] + 1))  # prompt and <|asst|>
        assert all(labels[e] == tok.eot_id for _, e in spans)
        answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        assert [tok.decode(ids[a + 1:e]) for a, e in spans] == answers


def test_mask_all_supervises_every_token(chats, small_tokenizer):
    ids, labels = encode_chat(small_tokenizer, chats[0]["messages"], mask="all")
    assert labels == ids and ids[0] == small_tokenizer.usr_id and ids[-1] == small_tokenizer.eot_id


def test_chat_without_assistant_is_rejected(small_tokenizer):
    with pytest.raises(PocketLMError, match="no assistant turn"):
        encode_chat(small_tokenizer, [{"role": "user", "content": "hello?"}])
    with pytest.raises(PocketLMError, match="sft mask 'user'"):
        encode_chat(small_tokenizer, [{"role": "assistant", "content": "hi"}], mask="user")


def test_document_ends_with_boundary(data_dir, small_tokenizer):
    docs = list(open_source("fineweb_edu:take=3", data_dir=data_dir))
    for doc, ids in zip(docs, encode_documents(small_tokenizer, [d["text"] for d in docs])):
        ids = ids.tolist()
        assert ids[-1] == small_tokenizer.eot_id and small_tokenizer.eot_id not in ids[:-1]
        assert small_tokenizer.decode(ids[:-1]) == doc["text"]


@pytest.mark.parametrize("mark", [False, True])
def test_bulk_encoding_equals_one_document_at_a_time(data_dir, small_tokenizer, encode_document, mark):
    # A literal U+2581 in any text takes the slower split path for the batch; without one, one call.
    texts = [d["text"] for d in open_source("fineweb_edu:take=5", data_dir=data_dir)]
    if mark:
        texts[2] = "a \u2581 b\u2581" + texts[2]
    got = [ids.tolist() for ids in encode_documents(small_tokenizer, texts)]
    assert got == [encode_document(small_tokenizer, t) for t in texts]


def test_window_positions_restart_after_eot():
    eot = 4
    x = np.array([[7, 8, 4, 9, 9, 9, 4, 4, 5]])
    positions, doc_ids = window_positions(x, eot)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0]]
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 3]]


def test_best_fit_pack_expected_rows():
    # Longest first: 5 opens row 0 (room 3), 4 opens row 1 (room 4), 3 fills row 0 exactly,
    # 3 goes to row 1 (room 1), 2 fits nowhere and opens row 2, 1 takes row 1's last slot.
    assert best_fit_pack([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    with pytest.raises(ValueError, match="outside 1..8"):
        best_fit_pack([9], 8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 32), max_size=60), st.integers(32, 64))
def test_best_fit_pack_places_each_item_once(lengths, capacity):
    rows = best_fit_pack(lengths, capacity)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
    # Best fit never leaves two rows that could have been merged at the end: at most one is half empty.
    assert sum(sum(lengths[i] for i in r) <= capacity // 2 for r in rows) <= 1
    assert best_fit_pack(lengths, capacity) == rows


def test_truncate_length_ends_inside_assistant_span():
    mask = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1])  # prompt, answer, prompt, answer
    assert truncate_length(mask, 20) == 11  # fits whole
    assert truncate_length(mask, 8) == 6  # cut after the first answer's last token
    assert truncate_length(mask, 10) == 10  # cut inside the second answer
    assert truncate_length(mask, 3) == 0  # no supervised token fits: unusable
    assert truncate_length(mask, 4) == 4


def test_pack_row_attention_is_block_diagonal_causal():
    a_ids, a_mask = np.array([2, 10, 11, 4, 3, 12, 4]), np.array([0, 0, 0, 0, 0, 1, 1])
    b_ids, b_mask = np.array([2, 13, 4, 3, 14, 15, 4]), np.array([0, 0, 0, 0, 1, 1, 1])
    row = pack_row([(a_ids, a_mask), (b_ids, b_mask)], 16, pad_id=4)
    assert row["x"].tolist() == a_ids.tolist() + b_ids.tolist() + [4, 4]
    assert row["y"].tolist() == [-100] * 4 + [12, 4, -100] + [-100] * 3 + [14, 15, 4, -100] + [-100] * 2
    assert row["positions"].tolist() == list(range(7)) + list(range(7)) + [0, 1]
    assert row["doc_ids"].tolist() == [0] * 7 + [1] * 7 + [2, 2]
    naive = np.zeros((16, 16), dtype=bool)
    for lo, hi in ((0, 7), (7, 14), (14, 16)):
        for i in range(lo, hi):
            for j in range(lo, i + 1):
                naive[i, j] = True
    # The mask the model builds from these doc_ids (True = may attend), for the one row and every head.
    _, mask = _attention_mask(16, 0, torch.from_numpy(row["doc_ids"])[None], False, torch.device("cpu"))
    assert np.array_equal(mask[0, 0].numpy(), naive)
