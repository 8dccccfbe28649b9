"""Benchmark: DistributedDataParallel on 1, 2, 4, 8 GPUs of one host in one call, against one GPU.

Runs `pocketlm train --phase pretrain` through torchrun on the same cache, config and data order:
  1. throughput: every N of --gpus, micro-batch --micro × 1 per GPU (global batch N × micro), R runs
     each, for every DDP variant of --variants (e.g. `static_graph`, `bucket_100mb`,
     `compiled_autograd`); scaling efficiency = tok/s(N) / (N × tok/s(1 GPU, default variant));
  2. parity: every N on one global batch (max N × micro rows: N GPUs × accumulation max/N), R runs
     each, so every layout reads the same rows in the same order and should train the same curve;
  3. resume: the max-N run killed with SIGKILL once its mid-run checkpoint exists, then resumed on
     one GPU from the rank-0 checkpoint to the end.
"Within noise" is measured, not assumed: GPU kernels are not bitwise deterministic, so repeats of one
layout already differ; the bench prints that repeat spread next to the gap between layouts. Each call
appends its numbers as one JSON line to bench/results.jsonl.

    python bench/ddp_scaling.py --cache CACHE --gpus 1 2 4 8 --compile --variants default static_graph \\
        bucket_100mb one_graph compiled_autograd -- --device cuda
    python bench/ddp_scaling.py --cache CACHE --gpus 1 2 --steps 20 -- --device cpu --model tiny --seq-len 64
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# `pocketlm train` flags of each DDP variant measured in the throughput part (see TrainConfig).
VARIANTS = {
    "default": [],
    "static_graph": ["--ddp-static-graph", "true"],
    "bucket_5mb": ["--ddp-bucket-mb", "5"],
    "bucket_100mb": ["--ddp-bucket-mb", "100"],
    "bucket_200mb": ["--ddp-bucket-mb", "200"],
    "one_graph": ["--ddp-graph-split", "false"],  # no split at the buckets: all-reduce after the backward
    "compiled_autograd": ["--compiled-autograd", "true"],
}


def train_cmd(nproc: int, args: argparse.Namespace, name: str, accum: int, variant: str = "default",
              resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pocketlm", "train", "--phase", "pretrain", "--cache", args.cache, "--runs-dir", args.runs,
            "--name", name, "--micro-batch", str(args.micro), "--accum-steps", str(accum),
            "--pretrain-steps", str(args.steps), *(["--warmup-steps", str(args.warmup)] if args.warmup else []),
            "--eval-every", str(args.steps // 2), "--eval-batches", "4", "--log-every", str(args.log_every),
            "--sample-tokens", "0", "--compile", str(args.compile).lower(), *VARIANTS[variant], *args.extra] \
        + (["--resume"] if resume else [])


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


def needs_ddp_only(variant: str) -> bool:
    """A variant made only of DDP options runs one GPU exactly as the default does."""
    return all(flag.startswith("--ddp-") for flag in VARIANTS[variant][::2])


def measured_device(extra: list[str]):
    """The device the `pocketlm train` runs use (their --device, else the automatic choice)."""
    from pocketlm.device import pick_device

    return pick_device(extra[extra.index("--device") + 1] if "--device" in extra else "auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--runs", default="/tmp/ddp_runs")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="process counts N (one GPU each)")
    ap.add_argument("--micro", type=int, default=16, help="rows per GPU per micro-batch")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=0, help="warmup steps (default: the train config's)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="uninterrupted runs per layout")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS),
                    help="DDP options whose throughput is measured at every N")
    ap.add_argument("--throughput-only", action="store_true", help="skip the parity and resume parts")
    ap.add_argument("extra", nargs="*", help="more `pocketlm train` flags, after --")
    args = ap.parse_args()
    gpus, top = sorted(set(args.gpus) | {1}), max(args.gpus)
    variants = ["default", *[v for v in args.variants if v != "default"]]
    half, runs = args.steps // 2, Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = (runs / "train.log").open("a")  # every run's output, for when one fails
    quiet = {"stdout": log, "stderr": subprocess.STDOUT, "env": {**os.environ, "PYTHONUNBUFFERED": "1"}}

    def run(n: int, name: str, accum: int, variant: str = "default", resume: bool = False) -> None:
        subprocess.run(train_cmd(n, args, name, accum, variant, resume), check=True, **quiet)

    # Repeats interleave the layouts, so a drift of the machine spreads over all of them.
    for i in range(args.repeats):
        for v in variants:
            for n in gpus:
                if n > 1 or not needs_ddp_only(v) or v == "default":
                    run(n, f"tp-{v}-{n}-{i}", 1, v)
        if not args.throughput_only:
            for n in gpus:
                if n < top:  # the top layout at accumulation 1 is the default throughput run
                    run(n, f"par-{n}-{i}", top // n)
    rate = {(v, n): statistics.median(tok_per_s(runs / f"tp-{v}-{n}-{i}", args.log_every, args.steps)
                                      for i in range(args.repeats))
            for v in variants for n in gpus if (runs / f"tp-{v}-{n}-0").exists()}
    base = rate[("default", 1)]
    print(f"micro-batch {args.micro} x T rows per GPU, {args.steps} steps, warmup {args.warmup or 'default'}, "
          f"compile={args.compile}, {args.repeats} runs per layout, median tok/s of the log lines after step "
          f"{args.log_every}")
    print(f"{'variant':>18} {'N':>2} {'tok/s':>12} {'speedup':>8} {'efficiency':>10}")
    record = {"micro": args.micro, "steps": args.steps,
              "compile": args.compile, "repeats": args.repeats, "extra": args.extra, "throughput": []}
    for (v, n), r in rate.items():
        print(f"{v:>18} {n:>2} {r:>12,.0f} {r / base:>7.2f}x {r / (n * base):>10.1%}")
        record["throughput"].append({"variant": v, "n": n, "tok_per_s": r, "efficiency": r / (n * base)})

    if not args.throughput_only:
        name = {n: (f"tp-default-{n}" if n == top else f"par-{n}") for n in gpus}
        curves = {n: [losses(runs / f"{name[n]}-{i}") for i in range(args.repeats)] for n in gpus}
        steps = sorted(set.intersection(*(set(c) for cs in curves.values() for c in cs)))
        print(f"parity, global batch {args.micro * top} rows (N GPUs x accumulation {top}/N), "
              f"train loss over {len(steps)} log lines:")
        record["parity"] = []
        for n in gpus:
            gap = max(abs(mean_at(curves[n], s) - mean_at(curves[1], s)) for s in steps)
            vals = [val_loss(runs / f"{name[n]}-{i}") for i in range(args.repeats)]
            print(f"  N={n}: repeat spread {spread(curves[n], steps):.4f}, largest |mean N - mean 1| {gap:.4f}, "
                  f"final train " + " ".join(f"{c[steps[-1]]:.4f}" for c in curves[n])
                  + " val " + " ".join(f"{v:.4f}" for v in vals))
            record["parity"].append({"n": n, "spread": spread(curves[n], steps), "gap_vs_1": gap, "val": vals})
        record["resume"] = resume_part(args, run, runs, top, half, curves[1], steps, quiet)
    results.append("ddp_scaling", measured_device(args.extra), [record])


def resume_part(args: argparse.Namespace, run, runs: Path, top: int, half: int, ones: list[dict[int, float]],
                steps: list[int], quiet: dict) -> dict:
    """Kill the top-N run after its mid-run checkpoint; resume it on one GPU; compare with one GPU."""
    proc = subprocess.Popen(train_cmd(top, args, "killed", 1), start_new_session=True, **quiet)
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
        raise SystemExit(f"the {top}-GPU run finished before it was killed: raise --steps")
    run(1, "killed", top, resume=True)
    killed = losses(runs / "killed")
    after = [s for s in steps if s > half and s in killed]
    worst = max(abs(killed[s] - mean_at(ones, s)) for s in after)
    print(f"{top}-GPU run killed after step {killed_at}, resumed on 1 GPU from step {half}: "
          f"max |resumed - mean 1 GPU| after the resume {worst:.4f} over {len(after)} log lines; "
          f"final {killed[args.steps]:.4f}")
    return {"killed_at": killed_at, "max_gap_after_resume": worst, "final": killed[args.steps]}


if __name__ == "__main__":
    main()
