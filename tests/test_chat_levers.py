"""The chat levers on CPU: the eot loss weight, midtraining, one chat per row, the eot/loop measures of
the held-out replies, and bench/chat_levers.py run end to end at tiny scale."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.cache.dataset import PretrainData, SFTData
from pocketlm.format import IGNORE_INDEX
from pocketlm.model import GPT, GPTConfig
from pocketlm.train.config import TrainConfig
from pocketlm.train.ddp import DistInfo
from pocketlm.train.loop import eot_weighting, train_step
from pocketlm.train.precision import Precision
from pocketlm.train.pretrain import MidtrainData, midtraining
from pocketlm.train.transcript import MODES, Reply, ask_model, repeats_phrase, summary

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(small_cache, data_dir) -> Path:
    return small_cache([("fineweb_edu:take=60", "pretrain"), ("roam:take=100", "pretrain"),
                        ("wikitext:take=40", "eval"), ("dolly:take=150", "sft"), ("oasst1:take=100", "sft"),
                        ("primer", "sft")], data_dir)


# --- the eot loss weight ------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [1.0, 4.0, 0.0])
def test_eot_weight_counts_eot_targets_that_many_times(weight):
    """The step's gradient equals that of sum(w_i * ce_i) / n over the targets, w = weight on eot."""
    torch.manual_seed(0)
    V, eot = 40, 3
    model = GPT(GPTConfig.tiny(vocab_size=V, block_size=16))
    ref = GPT(GPTConfig.tiny(vocab_size=V, block_size=16))
    ref.load_state_dict(model.state_dict())
    x = torch.randint(4, V, (2, 16))
    y = torch.randint(4, V, (2, 16))
    y[0, 5] = y[1, 9] = y[1, 15] = eot
    y[0, :3] = IGNORE_INDEX  # not a target: no loss, no weight
    batch = {"x": x, "y": y, "positions": torch.arange(16).expand(2, 16),
             "doc_ids": torch.zeros(2, 16, dtype=torch.long)}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, _ = train_step(model, opt, [batch], Precision.create(CPU, "fp32"), 0.0, CPU, DistInfo(), 0.0,
                         None if weight == 1.0 else (eot, weight))
    logits, _ = ref(x, positions=batch["positions"], doc_ids=batch["doc_ids"])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                           reduction="none")
    valid = y.flatten() != IGNORE_INDEX
    w = torch.where(y.flatten() == eot, weight, 1.0)
    ((ce * w)[valid].sum() / valid.sum()).backward()
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.allclose(q - q.grad, p, atol=1e-5), name  # SGD at lr 1 moved the model by -grad
    assert float(loss) == pytest.approx(float(ce[valid].mean()), abs=1e-5)  # the reported loss stays unweighted


def test_eot_weight_applies_to_sft_only_and_is_checked(small_tokenizer):
    tok = small_tokenizer
    assert eot_weighting(TrainConfig(sft_eot_weight=5.0), "sft", tok) == (tok.eot_id, 5.0)
    assert eot_weighting(TrainConfig(sft_eot_weight=5.0), "pretrain", tok) is None
    assert eot_weighting(TrainConfig(), "sft", tok) is None
    with pytest.raises(PocketLMError, match="sft_eot_weight must be in"):
        eot_weighting(TrainConfig(sft_eot_weight=-1.0), "sft", tok)


# --- midtraining and packing ----------------------------------------------------------------------------------

def test_midtraining_mixes_chats_into_the_last_steps(cache, small_tokenizer):
    cfg = TrainConfig(cache=str(cache), seq_len=64, pretrain_steps=20, midtrain_frac=0.25, midtrain_chat_share=0.5,
                      pretrain_mix=("fineweb_edu=0.9", "roam=0.1"), sft_sources=("dolly=1",))
    docs = PretrainData(cache, {"fineweb_edu": 0.9, "roam": 0.1}, 64, 0, "train")
    chats = SFTData(cache, {"dolly": 1.0}, 64, 0, "train")
    data = midtraining(cfg, docs, small_tokenizer)
    assert isinstance(data, MidtrainData) and data.start == 15
    before = data.batch(14, 8)
    assert all(s in ("fineweb_edu", "roam") for s in before["sources"])
    assert torch.equal(before["x"], docs.batch(14, 8)["x"])
    after = data.batch(15, 8, rank=1, world=2)
    assert after["sources"][:4] == docs.batch(15, 4, 1, 2)["sources"]
    assert set(after["sources"][4:]) == {"dolly"}
    for key in ("x", "y", "positions", "doc_ids"):
        assert torch.equal(after[key], torch.cat([docs.batch(15, 4, 1, 2)[key], chats.batch(15, 4, 1, 2)[key]]))
    assert (after["y"][4:] == IGNORE_INDEX).any() and not (after["y"][:4] == IGNORE_INDEX).any()  # chats: answers only
    assert data.chat_rows(19, 3) == 2 and data.chat_rows(19, 1) == 1  # rounded, at least one row
    with pytest.raises(PocketLMError, match="midtrain_chat_share must be in"):
        midtraining(dataclasses.replace(cfg, midtrain_chat_share=1.5), docs, small_tokenizer)


def test_one_chat_per_row(cache):
    packed = SFTData(cache, {"dolly": 1.0}, 256, 0, "train")
    single = SFTData(cache, {"dolly": 1.0}, 256, 0, "train", pack=False)
    assert single.n_rows("dolly") > packed.n_rows("dolly")
    b = single.batch(0, 16)
    for row_docs, row_y in zip(b["doc_ids"], b["y"]):
        assert len({int(d) for d, t in zip(row_docs, row_y) if t != IGNORE_INDEX}) == 1


# --- the held-out replies' measures ------------------------------------------------------------------------

def test_loop_measure_on_crafted_replies():
    assert repeats_phrase("I like it. I like it, i LIKE it! I like it")  # "i like it i" three times, any case
    assert repeats_phrase("the cat sat on the mat the cat sat on the mat the cat sat on the mat")
    assert not repeats_phrase("the cat sat on the mat and the cat sat on the mat")  # twice only
    assert not repeats_phrase("one two three four five six seven eight nine ten eleven twelve")
    assert not repeats_phrase("")


def test_eot_and_loop_rates_on_crafted_replies():
    loop = "you can go you can go you can go you can go"
    replies = [Reply("a", "greedy", "Paris.", "stop"), Reply("b", "greedy", loop, "length"),
               Reply("c", "greedy", "It is blue.", "stop"), Reply("d", "greedy", loop, "stop"),
               Reply("a", "sampled", "Paris!", "stop"), Reply("b", "sampled", "Hm", "length")]
    s = summary(replies)
    assert s["greedy"] == {"n": 4, "ended_on_eot": 0.75, "repeats_phrase": 0.5}
    assert s["sampled"] == {"n": 2, "ended_on_eot": 0.5, "repeats_phrase": 0.0}


def test_in_process_replies_equal_the_api_routes(tiny_model, server_url):
    model, tok = tiny_model
    prompts = ["Name a river.", "What is a poem?"]
    replies = ask_model(model, tok, prompts, 16)
    assert [r.mode for r in replies] == [m for m in MODES for _ in prompts]
    for r in replies:
        body = {"messages": [{"role": "user", "content": r.prompt}], "max_tokens": 16, "seed": prompts.index(r.prompt),
                **MODES[r.mode]}
        choice = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (r.text, r.finish_reason)
    penalized = ask_model(model, tok, prompts, 16, {"greedy": MODES["greedy"]}, {"repeat_penalty": 2.0})
    assert [r.text for r in penalized] != [r.text for r in replies if r.mode == "greedy"]


# --- the batch script ------------------------------------------------------------------------------------------

def test_chat_levers_script_runs_at_tiny_scale(cache, tmp_path):
    from bench import chat_levers

    out = tmp_path / "out"
    assert chat_levers.main(["--cache", str(cache), "--out", str(out), "--tiny", "--device", "cpu",
                             "--levers", "recipe,eot_weight_3,one_chat_per_row,midtrain_10pct",
                             "--decodings", "default,repeat_1.3", "--prompts", "2",
                             "--ablation-runs", "pocketlm:4:0.5:0:plain_init;baseline:4:0.0015:1"]) == 0
    rows = [json.loads(line) for line in (out / "chat_levers.jsonl").read_text().splitlines()]
    assert [(r["lever"], r["decoding"]) for r in rows] == [
        ("recipe", "default"), ("recipe", "repeat_1.3"), ("eot_weight_3", "default"), ("one_chat_per_row", "default"),
        ("midtrain_10pct", "default")]
    assert all(r["greedy_n"] == 2 and 0 <= r["sampled_ended_on_eot"] <= 1 for r in rows)
    runs = [json.loads(line) for line in (out / "recipe" / "recipe_runs.jsonl").read_text().splitlines()]
    assert [r["name"] for r in runs] == ["pocketlm 0.004p lr0.5 s0 plain_init", "baseline 0.004p lr0.0015 s1"]
    md = (out / "chat_levers.md").read_text()
    assert "| midtrain_10pct | default |" in md and "plain_init" in md


def test_chat_levers_refuses_a_typo_before_any_work(cache, tmp_path, capsys):
    from bench import chat_levers

    with pytest.raises(SystemExit):
        chat_levers.main(["--cache", str(cache), "--out", str(tmp_path), "--levers", "eot_weight3"])
    assert "eot_weight3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat_levers.main(["--cache", str(cache), "--out", str(tmp_path), "--ablation-runs", "pocketlm:4:0.5:0:qknorm"])
    assert "qknorm" in capsys.readouterr().err and not (tmp_path / "chat_levers.jsonl").exists()
