"""Multi-node training through torchrun's c10d rendezvous: two single-process "nodes" on this machine
(gloo) train the curve of one process on the same global batch, and their rank-0 checkpoint
continues on one process as if the run had never been split."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.cache.build_cache import build_cache
from pocketlm.model import GPT, GPTConfig
from pocketlm.train import metrics
from pocketlm.train.checkpoint import load_state
from pocketlm.train.config import TrainConfig
from pocketlm.train.ddp import DistInfo, device_for, wrap

REPO = Path(__file__).resolve().parents[1]
STEPS = 16  # the whole curve; the two-node run trains the first half, one process the second


@pytest.fixture(scope="module")
def cache(small_tokenizer, shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode_cache") / "cache"
    build_cache(small_tokenizer.path, [("fineweb_edu:take=150", "pretrain")], out, data_dir=shared_data,
                workers=1, val_fraction=0.1, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: torchrun starts its workers in sessions of their own, so killing the
    launcher's process group does not reach them."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def run_all(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    """Wait for every process to exit 0. The first failure kills the others at once: a node left
    alone would wait for its peer until the rendezvous times out."""
    deadline = time.monotonic() + timeout  # a safety net against a hang, not a timing assumption
    try:
        pending = list(procs)
        while pending:
            for proc in list(pending):
                try:
                    rc = proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                pending.remove(proc)
                assert rc == 0, f"{' '.join(proc.args)} exited {rc}:\n{Path(proc.log).read_text()}"
            assert time.monotonic() < deadline, "multi-node run did not finish"
    finally:
        kill_all([p for p in procs if p.poll() is None])


def two_node_launcher() -> tuple[str, ...]:
    """The command line of one of two nodes meeting at a free port of this machine (the README's
    multi-machine command with 127.0.0.1 as the first node's address)."""
    port = free_port()
    return ("-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"pocketlm-{port}", "--max-restarts", "0")


def pocketlm(*args: str, log: Path, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """`python [launcher] -m pocketlm ARGS`, its output in `log` (a pipe could fill up and block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, *launcher, "-m", "pocketlm", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def train_args(config: Path, name: str, steps: int, accum: int) -> list[str]:
    return ["train", "--config", str(config), "--phase", "pretrain", "--name", name, "--pretrain-steps", str(steps),
            "--accum-steps", str(accum)]


def write_config(path: Path, cache: Path, runs: Path) -> Path:
    # WSD without a decay (decay_frac 0): the LR does not depend on the phase's length, so a run of
    # STEPS/2 steps continued to STEPS is the same run as STEPS straight.
    path.write_text(f"""[train]
cache = "{cache}"
runs_dir = "{runs}"
model = "tiny"
seq_len = 64
micro_batch = 2
pretrain_mix = ["fineweb_edu=1"]
eval_sources = []
lr = 3e-3
warmup_steps = 3
schedule = "wsd"
decay_frac = 0.0
eval_every = 4
eval_batches = 2
log_every = 2
sample_tokens = 0
device = "cpu"
""")
    return path


def lines(run: Path, kind: str) -> list[dict]:
    return [r for r in metrics.read(run / "metrics.jsonl") if r["kind"] == kind and r.get("source", "all") == "all"]


def test_two_nodes_train_the_one_process_curve_and_resume_on_one_process(cache, tmp_path):
    config = write_config(tmp_path / "run.toml", cache, tmp_path)
    single = pocketlm(*train_args(config, "single", STEPS, accum=2), log=tmp_path / "single.log")
    node = two_node_launcher()
    nodes = [pocketlm(*train_args(config, "nodes", STEPS // 2, accum=1), log=tmp_path / f"node{i}.log", launcher=node)
             for i in range(2)]
    run_all([single, *nodes])
    assert json.loads((tmp_path / "nodes" / "config.json").read_text())["world_size"] == 2
    state = load_state(tmp_path / "nodes" / "pretrain" / "last")
    assert state["step"] == STEPS // 2
    assert state["config"]["accum_steps"] == 1
    assert len(lines(tmp_path / "nodes", "train")) == STEPS // 4  # each line written once, by rank 0

    resumed = pocketlm(*train_args(config, "nodes", STEPS, accum=2), "--resume", log=tmp_path / "resumed.log")
    run_all([resumed])

    want, got = lines(tmp_path / "single", "train"), lines(tmp_path / "nodes", "train")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(2, STEPS + 1, 2))
    for a, b in zip(want, got):  # steps 2..8 from the two nodes, 10..16 resumed on one process
        assert b["lr"] == a["lr"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0), b["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=0), b["step"]
    assert want[-1]["loss"] < want[0]["loss"]  # the curve compared is a training curve
    val_want, val_got = lines(tmp_path / "single", "eval"), lines(tmp_path / "nodes", "eval")
    assert [r["step"] for r in val_got] == [r["step"] for r in val_want] == [4, 8, 12, 16]
    for a, b in zip(val_want, val_got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0), b["step"]


def test_nodes_that_see_different_run_folders_stop_with_the_fix(cache, tmp_path):
    """A run folder on one node's disk only: every node stops with the same one-line error, none hangs."""
    config = write_config(tmp_path / "run.toml", cache, tmp_path)
    (tmp_path / "a" / "t" / "pretrain" / "last").mkdir(parents=True)  # what a killed run leaves on node A
    node = two_node_launcher()
    nodes = [pocketlm(*train_args(config, "t", 4, accum=1), "--runs-dir", str(tmp_path / runs), "--resume",
                      log=tmp_path / f"{runs}.log", launcher=node) for runs in ("a", "b")]
    try:
        codes = [proc.wait(timeout=300) for proc in nodes]
    finally:
        kill_all([p for p in nodes if p.poll() is None])
    assert all(rc != 0 for rc in codes)
    for runs in ("a", "b"):
        assert "pocketlm: error: " in (log := (tmp_path / f"{runs}.log").read_text())
        assert f"{tmp_path / runs / 't' / 'pretrain' / 'last'} exists for rank(s) " in log
        assert "every node must see the same run folder" in log


def test_a_node_with_fewer_gpus_than_processes_or_on_mps_is_told_so():
    second_of_two = DistInfo(rank=3, world=4, local_rank=1)
    if torch.cuda.device_count() < 2:
        with pytest.raises(PocketLMError, match=r"LOCAL_RANK=1 but this node has \d CUDA device\(s\): give torchrun "
                                                r"--nproc-per-node at most that many"):
            device_for(torch.device("cuda"), second_of_two)
    with pytest.raises(PocketLMError, match="several processes cannot share MPS"):
        device_for(torch.device("mps"), second_of_two)
    assert device_for(torch.device("cpu"), second_of_two) == torch.device("cpu")


@pytest.mark.parametrize(("options", "message"), [
    ({"compiled_autograd": True, "compile": False}, "compiled_autograd needs torch.compile: pass --compile true"),
    ({"ddp_bucket_mb": 0.0}, "ddp_bucket_mb=0.0: give a size in MB above 0"),
])
def test_ddp_options_that_cannot_work_are_refused(options, message):
    model = GPT(GPTConfig.tiny(vocab_size=64, block_size=16))
    with pytest.raises(PocketLMError, match=message):
        wrap(model, TrainConfig(**options), torch.device("cpu"), DistInfo())
