"""Benchmark: DistributedDataParallel on the GPUs of one host, against one GPU on the same global batch.

Runs `pocketlm train --phase pretrain` through torchrun on the same cache, config and data order:
  1. one GPU, accum = N, R times (the reference curves, uninterrupted);
  2. N GPUs, accum = 1, R times (uninterrupted);
  3. N GPUs, accum = 1, killed with SIGKILL once its mid-run checkpoint exists, then resumed on one GPU
     from the rank-0 checkpoint to the end.
Prints tokens/s for 1 and N GPUs (scaling efficiency = tok/s(N) / (N * tok/s(1))). "Within noise" is
measured, not assumed: GPU kernels are not bitwise deterministic, so repeats of one layout already
differ; the bench prints that repeat spread next to the gap between the 1-GPU and N-GPU means.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def train_cmd(nproc: int, args: argparse.Namespace, name: str, accum: int, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pocketlm", "train", "--phase", "pretrain", "--cache", args.cache, "--runs-dir", args.runs,
            "--name", name, "--micro-batch", str(args.micro), "--accum-steps", str(accum),
            "--pretrain-steps", str(args.steps), *(["--warmup-steps", str(args.warmup)] if args.warmup else []),
            "--eval-every", str(args.steps // 2), "--eval-batches", "4", "--log-every", "10",
            "--sample-tokens", "0", "--compile", str(args.compile).lower(), *args.extra] + (["--resume"] if resume else [])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run) if r["kind"] == "train"}


def val_loss(run: Path) -> float:
    return [r for r in rows(run) if r["kind"] == "eval" and r["source"] == "all"][-1]["loss"]


def spread(curves: list[dict[int, float]], steps: list[int]) -> float:
    """Largest max-min over the repeats at any logged step."""
    return max(max(c[s] for c in curves) - min(c[s] for c in curves) for s in steps)


def mean_at(curves: list[dict[int, float]], s: int) -> float:
    return statistics.fmean(c[s] for c in curves)


def tok_per_s(run: Path, first: int, last: int) -> float:
    return statistics.median(r["tok_per_s"] for r in rows(run) if r["kind"] == "train" and first < r["step"] <= last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--runs", default="/tmp/ddp_runs")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=0, help="warmup steps (default: the train config's)")
    ap.add_argument("--repeats", type=int, default=2, help="uninterrupted runs per layout")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("extra", nargs="*", help="more `pocketlm train` flags, after --")
    args = ap.parse_args()
    n, half, runs = args.gpus, args.steps // 2, Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = (runs / "train.log").open("a")  # every run's output, for when one fails
    quiet = {"stdout": log, "stderr": subprocess.STDOUT, "env": {**os.environ, "PYTHONUNBUFFERED": "1"}}

    for i in range(args.repeats):
        subprocess.run(train_cmd(1, args, f"one{i}", n), check=True, **quiet)
        subprocess.run(train_cmd(n, args, f"many{i}", 1), check=True, **quiet)
    # This N-GPU run is killed once rank 0 has written its mid-run checkpoint (step `half`).
    proc = subprocess.Popen(train_cmd(n, args, "killed", 1), start_new_session=True, **quiet)
    state = runs / "killed" / "pretrain" / "last" / "state.pt"
    while not state.exists() and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # the checkpoint folder is renamed into place whole; let the metrics line land too
    # torchrun starts its workers in sessions of their own: kill the launcher, then every worker.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", "--", f"--runs-dir {args.runs} --name killed "], check=False)
    time.sleep(1.0)
    killed_at = max(losses(runs / "killed"))
    if killed_at >= args.steps:
        raise SystemExit(f"the {n}-GPU run finished before it was killed: raise --steps")
    subprocess.run(train_cmd(1, args, "killed", n, resume=True), check=True, **quiet)

    ones = [losses(runs / f"one{i}") for i in range(args.repeats)]
    manys = [losses(runs / f"many{i}") for i in range(args.repeats)]
    steps = sorted(set.intersection(*(set(c) for c in ones + manys)))
    t1 = statistics.median(tok_per_s(runs / f"one{i}", 10, args.steps) for i in range(args.repeats))
    tn = statistics.median(tok_per_s(runs / f"many{i}", 10, args.steps) for i in range(args.repeats))
    gap = max(abs(mean_at(ones, s) - mean_at(manys, s)) for s in steps)
    print(f"global batch {args.micro * n} x T rows, {args.steps} steps, warmup {args.warmup or 'default'}, "
          f"compile={args.compile}, {args.repeats} runs per layout")
    print(f"tok/s: 1 GPU {t1:,.0f}  {n} GPUs {tn:,.0f}  -> speedup {tn / t1:.2f}x, "
          f"scaling efficiency {tn / (n * t1):.1%}")
    print(f"train loss over {len(steps)} log lines: repeat spread 1 GPU {spread(ones, steps):.4f}, "
          f"{n} GPUs {spread(manys, steps):.4f}; largest |mean 1 GPU - mean {n} GPUs| {gap:.4f}")
    last = steps[-1]
    print(f"train loss at step {last}: 1 GPU " + " ".join(f"{c[last]:.4f}" for c in ones)
          + f" | {n} GPUs " + " ".join(f"{c[last]:.4f}" for c in manys))
    print("final val loss: 1 GPU " + " ".join(f"{val_loss(runs / f'one{i}'):.4f}" for i in range(args.repeats))
          + f" | {n} GPUs " + " ".join(f"{val_loss(runs / f'many{i}'):.4f}" for i in range(args.repeats)))
    killed = losses(runs / "killed")
    after = [s for s in steps if s > half and s in killed]
    print(f"{n}-GPU run killed after step {killed_at}, resumed on 1 GPU from step {half}: "
          f"max |resumed - mean 1 GPU| after the resume {max(abs(killed[s] - mean_at(ones, s)) for s in after):.4f} "
          f"over {len(after)} log lines; final {killed[args.steps]:.4f}")


if __name__ == "__main__":
    main()
