"""The prefetching batch source on real cache data: the synchronous loop's batches in its order from any
start step, the worker's errors raised in the caller with their step, no worker thread left behind however
the loop ends, pinning only for CUDA, and host-only work under MPS's rules."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.cache.dataset import PretrainData, SFTData
from pocketlm.model import GPT, GPTConfig
from pocketlm.train import metrics
from pocketlm.train.config import TrainConfig
from pocketlm.train.ddp import DistInfo
from pocketlm.train.loop import RunContext, micro_batches, run_phase
from pocketlm.train.prefetch import Prefetcher
from pocketlm.train.pretrain import pretrain_phase

CPU = torch.device("cpu")
WAIT_S = 60  # the longest any event is waited for; reached only when something is broken


@pytest.fixture(scope="module")
def cache(small_cache, data_dir) -> Path:
    return small_cache([("fineweb_edu:take=60", "pretrain"), ("roam:take=100", "pretrain"), ("dolly:take=150", "sft")],
                       data_dir)


def dataset(cache: Path, kind: str = "pretrain"):
    if kind == "pretrain":
        return PretrainData(cache, {"fineweb_edu": 0.7, "roam": 0.3}, 64, 0)
    with pytest.warns(UserWarning, match="were skipped"):  # the conversations longer than a row
        return SFTData(cache, ["dolly"], 128, 0)


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
                                     for k in x) for x, y in zip(a, b))


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


class Recorder:
    """`make(step)` of real micro-batches that records which thread built each step and signals each one."""

    def __init__(self, data, accum: int = 2, rank: int = 0, world: int = 1) -> None:
        self.data, self.accum, self.rank, self.world = data, accum, rank, world
        self.built: dict[int, threading.Event] = {}
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def event(self, step: int) -> threading.Event:
        with self.lock:
            return self.built.setdefault(step, threading.Event())

    def __call__(self, step: int) -> list[dict]:
        out = micro_batches(self.data, step, 3, self.accum, self.rank, self.world)
        self.threads.add(threading.current_thread().name)
        self.event(step).set()
        return out


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
@pytest.mark.parametrize("start", [0, 7])  # 7: a run resumed mid-range
def test_batches_equal_the_synchronous_ones_in_step_order(cache, kind, start):
    data = dataset(cache, kind)
    make = Recorder(data, accum=2, rank=1, world=2)
    with Prefetcher(make, start, 12, CPU, depth=2) as prefetch:
        got = [prefetch.get(s) for s in range(start, 12)]
    want = [micro_batches(data, s, 3, 2, 1, 2) for s in range(start, 12)]
    assert all(same(g, w) for g, w in zip(got, want)) and len(got) == len(want) == 12 - start
    assert not same(got[0], got[1])  # consecutive steps differ: order is checked, not just content
    assert make.threads == {f"prefetch steps {start}-11"}  # built by the worker, not by get()
    with pytest.raises(ValueError, match="next step is 12"):
        prefetch.get(12)


def test_the_worker_runs_ahead_and_steps_are_asked_for_in_order(cache):
    make = Recorder(dataset(cache))
    with Prefetcher(make, 3, 20, CPU, depth=2) as prefetch:
        prefetch.get(3)
        # Step 3 handed out: steps 4 and 5 are built without anyone asking for them.
        assert make.event(4).wait(WAIT_S) and make.event(5).wait(WAIT_S)
        with pytest.raises(ValueError, match="asked for step 5; the prefetcher's next step is 4"):
            prefetch.get(5)
        assert same(prefetch.get(4), micro_batches(make.data, 4, 3, 2))


def test_an_error_in_the_worker_is_raised_in_the_caller_with_its_step(cache):
    data = dataset(cache)

    def make(step: int) -> list[dict]:  # from step 5 on, a rank outside the world: the data refuses
        return [data.batch(step, 2, rank=0 if step < 5 else 3, world=2)]

    with Prefetcher(make, 2, 10, CPU) as prefetch:
        assert [len(prefetch.get(s)) for s in (2, 3, 4)] == [1, 1, 1]
        with pytest.raises(PocketLMError, match="rank 3 is outside world size 2") as err:
            prefetch.get(5)
    assert any("step 5" in note for note in err.value.__notes__)
    assert prefetch_threads() == []


@pytest.mark.parametrize("end", ["all steps", "early break", "error in the loop"])
def test_the_worker_is_joined_however_the_loop_ends(cache, end):
    make = Recorder(dataset(cache))
    before = set(threading.enumerate())
    stop = 6 if end == "all steps" else 50
    with pytest.raises(RuntimeError) if end == "error in the loop" else nullcontext():
        with Prefetcher(make, 0, stop, CPU, depth=2) as prefetch:
            for step in range(stop):
                prefetch.get(step)
                if step == 1 and end != "all steps":
                    # Steps 2 and 3 are built: the worker is blocked on its full queue, or about to be.
                    assert make.event(3).wait(WAIT_S)
                    assert [t.name for t in prefetch_threads()] == ["prefetch steps 0-49"]
                    if end == "error in the loop":
                        raise RuntimeError("the step failed")
                    break
    assert set(threading.enumerate()) == before
    if end != "all steps":  # closed with steps 2, 3 queued and 4 at most in hand: nothing further is built
        assert not make.event(5).is_set()


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_no_pinning_off_cuda(cache, device):
    make = Recorder(dataset(cache))
    with Prefetcher(make, 0, 2, torch.device(device)) as prefetch:  # the worker never touches the device
        assert not prefetch.pin
        batches = prefetch.get(0)
    assert not any(t.is_pinned() for b in batches for t in b.values() if isinstance(t, torch.Tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_on_cuda(cache):
    make = Recorder(dataset(cache))
    with Prefetcher(make, 0, 2, torch.device("cuda")) as prefetch:
        batches = prefetch.get(0)
    assert prefetch.pin and all(b[k].is_pinned() for b in batches for k in ("x", "y", "positions", "doc_ids"))
    assert same(batches, micro_batches(make.data, 0, 3, 2))


def test_host_tensor_work_in_the_worker_is_not_device_work_under_mps_rules(mps_rules, cache):
    data = dataset(cache, "sft")
    torch.ones(4).sum()  # this thread uses the device without a lock, as the training loop does

    def make(step: int) -> list[dict]:  # micro-batches joined on the host: torch ops in the worker thread
        a, b = micro_batches(data, step, 2, 2)
        return [{k: torch.cat([a[k], b[k]]) for k in ("x", "y", "positions", "doc_ids")}]

    with Prefetcher(make, 0, 3, CPU) as prefetch:
        got = [prefetch.get(s) for s in range(3)]
    assert all(torch.equal(g[0]["x"], torch.cat([m["x"] for m in micro_batches(data, s, 2, 2)]))
               for s, g in enumerate(got))


def fresh_model(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=vocab, block_size=64))


def tiny_run(cache: Path, tok, tmp_path: Path, **over) -> tuple[RunContext, TrainConfig]:
    values = dict(name="t", runs_dir=str(tmp_path), cache=str(cache), model="tiny", seq_len=64, micro_batch=2,
                  accum_steps=1, pretrain_steps=40, lr=3e-3, eval_every=5, eval_batches=1, log_every=5,
                  sample_tokens=0, device="cpu", pretrain_mix=("fineweb_edu=1.0",), eval_sources=())
    cfg = TrainConfig(**{**values, **over})
    run = RunContext(cfg, tmp_path / "t", CPU, tok, DistInfo(), log=lambda _m: None)
    run.run_dir.mkdir(parents=True)
    return run, cfg


class Watched:
    """A phase's training data whose batch() records the thread that builds it, and from step `fail_at` on
    asks the real data for a rank outside the world, which it refuses."""

    def __init__(self, data, fail_at: int | None = None) -> None:
        self.data, self.fail_at, self.threads = data, fail_at, set()

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and step >= self.fail_at:
            rank, world = 5, 2
        return self.data.batch(step, batch_size, rank, world)


def test_an_early_stopped_phase_leaves_no_worker(cache, small_tokenizer, tmp_path):
    # lr = 0: the validation loss never improves after the first evaluation, so patience 2 stops at step 15.
    run, cfg = tiny_run(cache, small_tokenizer, tmp_path, lr=0.0, patience=2)
    phase = pretrain_phase(cfg, small_tokenizer, log=lambda _m: None)
    phase.train = watched = Watched(phase.train)
    run_phase(run, phase, fresh_model(small_tokenizer.vocab_size), small_tokenizer.path)
    assert max(r["step"] for r in metrics.read(run.metrics_path)) == 15
    assert watched.threads == {"prefetch steps 0-39"} and prefetch_threads() == []


def test_a_data_error_mid_phase_names_its_step_and_leaves_no_worker(cache, small_tokenizer, tmp_path):
    run, cfg = tiny_run(cache, small_tokenizer, tmp_path, pretrain_steps=12)
    phase = pretrain_phase(cfg, small_tokenizer, log=lambda _m: None)
    phase.train = Watched(phase.train, fail_at=7)
    with pytest.raises(PocketLMError, match="rank 5 is outside world size 2") as err:
        run_phase(run, phase, fresh_model(small_tokenizer.vocab_size), small_tokenizer.path)
    assert any("step 7" in note for note in err.value.__notes__)
    assert max(r["step"] for r in metrics.read(run.metrics_path)) == 5  # the last log line before step 7
    assert prefetch_threads() == []
