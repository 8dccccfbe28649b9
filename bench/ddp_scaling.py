"""Benchmark: DistributedDataParallel on the GPUs of one host, against one GPU on the same global batch.

Runs `pocketlm train --phase pretrain` through torchrun three times on the same cache and config:
  1. one GPU, accum = N (the reference curve, uninterrupted);
  2. N GPUs, accum = 1, killed with SIGKILL once its mid-run checkpoint exists;
  3. one GPU resuming run 2's rank-0 checkpoint to the end.
Prints tokens/s for 1 and N GPUs (scaling efficiency = tok/s(N) / (N * tok/s(1))), the largest loss
difference between runs 1 and 2 over the shared steps, and between runs 3 and 1 after the resume.
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
            "--pretrain-steps", str(args.steps), "--warmup-steps", str(args.steps // 10),
            "--eval-every", str(args.steps // 2), "--eval-batches", "4", "--log-every", "10",
            "--sample-tokens", "0", "--compile", str(args.compile).lower(), *args.extra] + (["--resume"] if resume else [])


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def tok_per_s(run: Path, first: int, last: int) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tok_per_s"] for r in rows if r["kind"] == "train" and first < r["step"] <= last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--runs", default="/tmp/ddp_runs")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("extra", nargs="*", help="more `pocketlm train` flags, after --")
    args = ap.parse_args()
    n, half, runs = args.gpus, args.steps // 2, Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = (runs / "train.log").open("a")  # every run's output, for when one fails
    quiet = {"stdout": log, "stderr": subprocess.STDOUT, "env": {**os.environ, "PYTHONUNBUFFERED": "1"}}

    subprocess.run(train_cmd(1, args, "one", n), check=True, **quiet)
    # The N-GPU run is killed once rank 0 has written its mid-run checkpoint (step `half`).
    proc = subprocess.Popen(train_cmd(n, args, "many", 1), start_new_session=True, **quiet)
    state = runs / "many" / "pretrain" / "last" / "state.pt"
    while not state.exists() and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # the checkpoint folder is renamed into place whole; let the metrics line land too
    # torchrun starts its workers in sessions of their own: kill the launcher, then every worker.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", "--", f"--runs-dir {args.runs} --name many "], check=False)
    time.sleep(1.0)
    killed_at = max(losses(runs / "many"))
    if killed_at >= args.steps:
        raise SystemExit(f"the {n}-GPU run finished before it was killed: raise --steps")
    subprocess.run(train_cmd(1, args, "many", n, resume=True), check=True, **quiet)

    one, many = losses(runs / "one"), losses(runs / "many")
    before = [s for s in one if s <= half and s in many]
    after = [s for s in one if s > half and s in many]
    t1, tn = tok_per_s(runs / "one", 10, half), tok_per_s(runs / "many", 10, half)
    print(f"global batch {args.micro * n} x T rows, {args.steps} steps, compile={args.compile}")
    print(f"tok/s: 1 GPU {t1:,.0f}  {n} GPUs {tn:,.0f}  -> speedup {tn / t1:.2f}x, "
          f"scaling efficiency {tn / (n * t1):.1%}")
    print(f"loss, 1 GPU vs {n} GPUs, steps <= {half}: max |diff| "
          f"{max(abs(one[s] - many[s]) for s in before):.4f} over {len(before)} log lines")
    print(f"loss, resumed on 1 GPU from the {n}-GPU checkpoint vs uninterrupted 1 GPU, steps > {half}: "
          f"max |diff| {max(abs(one[s] - many[s]) for s in after):.4f} over {len(after)} log lines")
    print(f"{n}-GPU run killed after step {killed_at}; final loss: 1 GPU {one[args.steps]:.4f}, "
          f"resumed {many[args.steps]:.4f}")


if __name__ == "__main__":
    main()
