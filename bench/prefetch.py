"""`pocketlm train` tokens/s with each step's micro-batches built in the background thread (the loop as
it is), beside the synchronous loop (the peer: each step builds its batches when it needs them), in
one process, interleaved, the order alternating from one repeat to the next.

Also times building one step's micro-batches alone, and how long the loop waits for each step's
batches in either mode: the host work the prefetcher takes off the step.
Needs a token cache (`pocketlm cache build`); trains the pretrain phase only, without samples.

    python bench/prefetch.py --cache CACHE --device cpu --model tiny --micro-batch 4 --seq-len 256 --steps 60
    python bench/prefetch.py --cache CACHE --device cuda --model v1 --micro-batch 32 --seq-len 1024 --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results  # noqa: E402
from pocketlm.cache.dataset import PretrainData  # noqa: E402
from pocketlm.device import pick_device  # noqa: E402
from pocketlm.train import loop, metrics  # noqa: E402
from pocketlm.train.config import TrainConfig  # noqa: E402
from pocketlm.train.pretrain import parse_mix  # noqa: E402
from pocketlm.train.run import train  # noqa: E402


class Synchronous:
    """The loop without prefetching: get(step) builds the step's batches when asked, in this thread."""

    def __init__(self, make: Callable[[int], list[dict]], *_args: object, **_kw: object) -> None:
        self.make = make

    def get(self, step: int) -> list[dict]:
        return self.make(step)

    def close(self) -> None:
        pass


def timed(cls: type, waits: list[float]) -> type:
    """`cls` whose get() appends the seconds the training loop waited in it to `waits`."""
    class Timed(cls):
        def get(self, step: int) -> list[dict]:
            t0 = time.perf_counter()
            try:
                return super().get(step)
            finally:
                waits.append(time.perf_counter() - t0)
    return Timed


def tok_per_s(run_dir: Path) -> float:
    """Median of the run's train lines, the first (warm-up) left out."""
    lines = [r["tok_per_s"] for r in metrics.read(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    return statistics.median(lines[1:])


def build_ms(cfg: TrainConfig, n: int = 30) -> float:
    """Median wall time of building one step's micro-batches on this host."""
    data = PretrainData(cfg.cache, parse_mix(cfg.pretrain_mix), cfg.seq_len, cfg.seed)
    times = []
    for step in range(n):
        t0 = time.perf_counter()
        loop.micro_batches(data, step, cfg.micro_batch, cfg.accum_steps)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--mix", nargs="+", default=["fineweb_edu=0.95", "roam=0.05"])
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="tiny")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = pick_device(args.device)
    modes = {"prefetch": loop.Prefetcher, "synchronous": Synchronous}
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    waits: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as runs:
        cfg = TrainConfig(runs_dir=runs, cache=args.cache, model=args.model, seq_len=args.seq_len,
                          micro_batch=args.micro_batch, accum_steps=args.accum_steps, pretrain_steps=args.steps,
                          eval_every=args.steps, eval_batches=1, log_every=args.log_every, sample_tokens=0,
                          device=args.device, pretrain_mix=tuple(args.mix), eval_sources=(), patience=0)
        ms = build_ms(cfg)
        for r in range(args.repeats):
            for mode in list(modes)[:: 1 if r % 2 == 0 else -1]:
                name = f"{mode}-{r}"
                with mock.patch.object(loop, "Prefetcher", timed(modes[mode], waits[mode])):
                    train(TrainConfig(**{**vars(cfg), "name": name}), {"block_size": args.seq_len}, pipeline="pretrain")
                speeds[mode].append(tok_per_s(Path(runs) / name))
    ratios = [a / b for a, b in zip(speeds["prefetch"], speeds["synchronous"])]
    print(f"\n{results.device_label(device)}, torch {torch.__version__}: model {args.model}, B={args.micro_batch} "
          f"x accum {args.accum_steps}, T={args.seq_len}, {args.steps} steps a run, {args.repeats} repeats")
    print(f"building one step's micro-batches alone: {ms:.2f} ms (median)")
    wait_ms = {m: 1000 * statistics.median(v) for m, v in waits.items()}
    print(f"{'loop':<12} {'tok/s per repeat':<40} {'median':>8} {'waits for batches (ms, median)':>32}")
    for mode, v in speeds.items():
        print(f"{mode:<12} {' '.join(f'{x:,.0f}' for x in v):<40} {statistics.median(v):>8,.0f} {wait_ms[mode]:>32.3f}")
    print(f"prefetch / synchronous per repeat: {' '.join(f'{x:.3f}' for x in ratios)} "
          f"(median {statistics.median(ratios):.3f})")
    results.append("prefetch", device, [{
        "model": args.model, "micro_batch": args.micro_batch, "accum_steps": args.accum_steps,
        "seq_len": args.seq_len, "steps": args.steps, "build_ms": round(ms, 3),
        "wait_ms": {m: round(x, 4) for m, x in wait_ms.items()},
        "tok_per_s": {m: [round(x) for x in v] for m, v in speeds.items()},
        "ratio_median": round(statistics.median(ratios), 4)}])


if __name__ == "__main__":
    main()
