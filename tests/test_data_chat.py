"""Chat sources on real data: dolly, oasst1 (threads vs the source trees) and the shipped primer.

Each loader test runs on the fixture slices and, marked full_data, on the whole mirror.
"""

from __future__ import annotations

import json

import pytest

from pocketlm.data.sources import SourceStats, open_source

# What each data set holds, counted from the source rows: English root prompts with an answer, the
# threads of `branches=all`, deleted messages, and (not deleted) messages that failed review.
OASST1 = {"fixture": {"best": 2, "all": 7, "deleted": 1, "failed review": 3},
          "full": {"best": 182, "all": 883, "deleted": 40, "failed review": 43}}
DOLLY_RECORDS = {"fixture": 160, "full": 14515}


@pytest.fixture()
def oasst_rows(data_set):
    path = data_set.path / "oasst1" / "oasst1_validation_en.jsonl"
    return {r["message_id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def _check_thread(rec, rows):
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["user", "assistant"] * (len(roles) // 2)  # starts with user, alternates, ends on assistant
    ids = rec["meta"]["message_ids"]
    assert rows[ids[0]]["parent_id"] is None
    for prev, cur in zip(ids, ids[1:]):
        assert rows[cur]["parent_id"] == prev
    for mid, m in zip(ids, rec["messages"]):
        src = rows[mid]
        assert m["content"] == src["text"].strip()
        assert {"prompter": "user", "assistant": "assistant"}[src["role"]] == m["role"]
        assert not src["deleted"] and src["review_result"] is not False and src["lang"] == "en"
    assert rec["id"] == ids[-1]


def test_oasst1_best_threads_follow_the_source_trees(data_set, oasst_rows):
    stats = SourceStats()
    recs = list(open_source("oasst1", data_dir=data_set.path, stats=stats))
    want = OASST1[data_set.name]
    assert len(recs) == want["best"]  # one per English root prompt
    assert stats.dropped == {"message: deleted": want["deleted"], "message: failed review": want["failed review"]}
    assert len(recs) == sum(r["parent_id"] is None for r in oasst_rows.values())
    for rec in recs:
        _check_thread(rec, oasst_rows)
        # The best branch: no usable sibling of a chosen assistant reply has a better (lower) rank.
        for mid in rec["meta"]["message_ids"]:
            row = oasst_rows[mid]
            if row["role"] == "assistant" and row["rank"] is not None:
                siblings = [r for r in oasst_rows.values() if r["parent_id"] == row["parent_id"]
                            and r["rank"] is not None and not r["deleted"] and r["review_result"]]
                assert row["rank"] == min(r["rank"] for r in siblings)


def test_oasst1_all_branches(data_set, oasst_rows):
    stats = SourceStats()
    recs = list(open_source("oasst1:branches=all", data_dir=data_set.path, stats=stats))
    want = OASST1[data_set.name]["all"]
    assert len(recs) == want
    assert len({tuple(r["meta"]["message_ids"]) for r in recs}) == want
    for rec in recs:
        _check_thread(rec, oasst_rows)
    # Every kept assistant reply is the end of, or inside, some thread.
    used = {mid for r in recs for mid in r["meta"]["message_ids"]}
    kept_replies = {m for m, r in oasst_rows.items() if r["role"] == "assistant" and not r["deleted"]
                    and r["review_result"] and r["parent_id"] in oasst_rows}
    assert kept_replies - used == set()


def test_oasst1_orphans_are_counted_not_emitted(data_dir, tmp_path):
    path = data_dir / "oasst1" / "oasst1_validation_en.jsonl"
    oasst_rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    tree = oasst_rows[0]["message_tree_id"]
    lines = [json.dumps(r) for r in oasst_rows if r["message_tree_id"] == tree and r["parent_id"]]
    kept = [json.loads(x) for x in lines]
    (tmp_path / "oasst1").mkdir()
    (tmp_path / "oasst1" / "no_root.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = SourceStats()
    assert list(open_source("oasst1", data_dir=tmp_path, stats=stats)) == []
    good = sum(1 for r in kept if not r["deleted"] and r["review_result"] is not False)
    assert stats.dropped["message: orphan (parent not in the data)"] + \
        stats.dropped["message: under a dropped message"] == good
    assert stats.dropped["message: orphan (parent not in the data)"] > 0


def test_dolly_context_goes_into_the_user_turn(data_set):
    stats = SourceStats()
    recs = list(open_source("dolly", data_dir=data_set.path, stats=stats))
    n = DOLLY_RECORDS[data_set.name]
    assert stats.records == n and not stats.dropped
    first, second = recs[0], recs[1]
    user = first["messages"][0]["content"]
    assert user.startswith("When did Virgin Australia start operating?\n\nContext:\nVirgin Australia, the trading")
    assert first["messages"][1] == {"role": "assistant", "content": "Virgin Australia commenced services on "
                                    "31 August 2000 as Virgin Blue, with two aircraft on a single route."}
    assert second["messages"][0]["content"] == "Which is a species of fish? Tope or Rope"
    assert first["meta"] == {"category": None}
    assert [m["role"] for r in recs for m in r["messages"]] == ["user", "assistant"] * n


def test_shipped_primer_is_valid():
    stats = SourceStats()
    recs = list(open_source("primer", stats=stats))
    assert stats.records == 39 and not stats.dropped
    assert any(r["messages"][0]["role"] == "system" for r in recs)
    assert any(len(r["messages"]) >= 4 for r in recs)
    for r in recs:
        roles = [m["role"] for m in r["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2)
    # {"prompt", "response", "system"} lines become the same chat shape.
    last = recs[-1]
    assert last["id"] == "primer-038"
    assert last["messages"] == [{"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": "Say hello in French."},
                                {"role": "assistant", "content": "Bonjour!"}]
