"""One training step per precision mode: tokens/s and peak memory against the planner's prediction.

Runs the real training step (pocketlm.train.loop.train_step) on synthetic packed rows, at the v1
shape and the micro-batch `pocketlm plan` picks for a 16 GB Mac unless told otherwise.

    python bench/train_step.py --device cuda                  # bf16, fp16 + GradScaler, bf16 + compile
    python bench/train_step.py --device cuda --modes fp16+math  # fp16 with attention stored as on MPS
    python bench/train_step.py --device cpu --modes fp32 --n-layer 2 --n-embd 128 --json

CUDA peak is torch.cuda.max_memory_allocated; CPU peak is the growth of the process's peak RSS from
just before the model is built (on macOS the peak cannot be reset: run one mode per process there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pocketlm.model import GPT, GPTConfig
from pocketlm.train.ddp import DistInfo
from pocketlm.train.loop import train_step
from pocketlm.train.optim import build_adamw
from pocketlm.train.plan import estimate, plan
from pocketlm.train.precision import Precision


def synthetic_batch(B: int, T: int, V: int, docs_per_row: int, gen: torch.Generator) -> dict:
    """Random tokens in rows of `docs_per_row` packed documents (positions restart, doc ids change)."""
    x = torch.randint(5, V, (B, T), generator=gen)
    y = torch.randint(5, V, (B, T), generator=gen)
    doc_len = max(1, T // docs_per_row)
    idx = torch.arange(T)
    doc_ids = (idx // doc_len).expand(B, T).contiguous()
    positions = (idx % doc_len).expand(B, T).contiguous()
    return {"x": x, "y": y, "positions": positions, "doc_ids": doc_ids}


def _status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def reset_peak_rss() -> int:
    """Start a new peak-RSS window; returns the RSS it starts from (bytes).

    Linux: writing 5 to clear_refs resets VmHWM to the current RSS (ru_maxrss cannot be used: it is
    kept across execve, so a child of a big process inherits the parent's peak).
    """
    if sys.platform == "linux":
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes, never reset


def peak_rss() -> int:
    if sys.platform == "linux":
        return _status_kb("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def warm_up_kernels(device: torch.device) -> None:
    """One step of a minute model, so library code and thread pools are already in the CPU baseline."""
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=8)
    model = GPT(cfg).to(device)
    batch = synthetic_batch(1, 16, 64, 2, torch.Generator().manual_seed(0))
    train_step(model, build_adamw(model, 1e-4, 0.1, 0.95, device), [batch], Precision.create(device, "fp32"),
               1.0, device, DistInfo())


def run_mode(mode: str, cfg: GPTConfig, B: int, T: int, steps: int, device: torch.device) -> dict:
    precision, *extras = mode.split("+")
    compiled, math_attention = "compile" in extras, "math" in extras
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if device.type == "cpu":
        warm_up_kernels(device)
    rss0 = reset_peak_rss()
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = build_adamw(model, 1e-4, 0.1, 0.95, device)
    prec = Precision.create(device, precision)
    step_model = torch.compile(model) if compiled else model
    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(B, T, cfg.vocab_size, 4, gen)
    # "+math" forces the math attention kernel, which stores the attention pattern as MPS does.
    def attention() -> contextlib.AbstractContextManager:
        return sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    times = []
    for i in range(steps + 2):  # two warm-up steps: optimizer state allocation, compilation
        t0 = time.perf_counter()
        with attention():
            loss, _ = train_step(step_model, opt, [batch], prec, 1.0, device, DistInfo())
        float(loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    dt = sum(times[2:]) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss() - rss0
    pred = estimate(cfg, B, T, precision, "mps" if math_attention else device.type, checkpointing=False).total
    del model, opt, step_model
    return {"mode": mode, "micro_batch": B, "seq_len": T, "tok_per_s": B * T / dt, "ms_per_step": 1000 * dt,
            "peak_bytes": peak, "predicted_bytes": pred, "ratio": peak / pred, "loss": float(loss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"))
    ap.add_argument("--modes", nargs="+", default=["bf16", "fp16", "bf16+compile"],
                    help="fp32 | bf16 | fp16, optionally +compile and/or +math (MPS-like attention)")
    ap.add_argument("--micro-batch", type=int, help="rows per step (default: the plan for a 16 GB Mac)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-embd", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--json", action="store_true", help="one JSON line per mode instead of a table")
    args = ap.parse_args()
    overrides = {k: v for k in ("n_layer", "n_embd", "n_head", "vocab_size") if (v := getattr(args, k)) is not None}
    cfg = GPTConfig.v1(**overrides)
    B = args.micro_batch or plan(cfg, args.seq_len, "mps", 16 << 30, 65536).micro_batch
    device = torch.device(args.device)
    if not args.json:
        print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}, "
              f"torch {torch.__version__}, model {cfg}")
        print(f"{'mode':<14}{'B':>4}{'tok/s':>12}{'ms/step':>10}{'peak GiB':>10}{'pred GiB':>10}{'peak/pred':>10}")
    for mode in args.modes:
        r = run_mode(mode, cfg, B, args.seq_len, args.steps, device)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{mode:<14}{B:>4}{r['tok_per_s']:>12,.0f}{r['ms_per_step']:>10.1f}{r['peak_bytes'] / 2**30:>10.2f}"
                  f"{r['predicted_bytes'] / 2**30:>10.2f}{r['ratio']:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
