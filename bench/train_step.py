"""One training step per precision mode: tokens/s and peak memory against the planner's prediction,
beside HF `LlamaForCausalLM` of the same shape in the same run.

Runs the real training step (pocketlm.train.loop.train_step) on synthetic packed rows (4 documents a
row, attention kept within documents), at the v1 shape and the micro-batch `pocketlm plan` picks for a
16 GB Mac unless told otherwise. Modes: PRECISION[+compile][+sdpa][+math][+logits]; `hf:` in front
runs the peer instead (plain causal attention over the row: HF has no packed-document masks).
- +compile: the accelerated path (torch.compile, flex attention over documents, chunked loss);
  +sdpa keeps SDPA's dense document mask under compile, +logits the full-logits loss.

    python bench/train_step.py --device cuda --micro-batch 32 --modes bf16+compile hf:bf16+compile bf16 hf:bf16
    python bench/train_step.py --device cuda --modes fp16+math  # fp16 with attention stored as on MPS
    python bench/train_step.py --device cpu --micro-batch 4 --seq-len 256 --modes fp32 hf:fp32 --repeats 3

Peaks are bytes of live tensors, compared with the planner's `live` estimate (its `total` adds 10% for
fragmentation). CUDA: torch.cuda.max_memory_allocated. CPU: the growth of the process's peak RSS from
just before the model is built, with glibc's mmap threshold fixed at 128 KiB so that every tensor of
that size or more is its own mapping, returned on free (by default glibc raises the threshold after
the first large free and then keeps freed tensors resident in its heap: the same step measured
195-226 MB over five runs, and 174 MB every time with the threshold fixed). On macOS the peak cannot
be reset: run one mode per process there.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results  # noqa: E402
from bench.hf_peer import hf_llama  # noqa: E402
from pocketlm.model import GPT, GPTConfig  # noqa: E402
from pocketlm.train.ddp import DistInfo  # noqa: E402
from pocketlm.train.loop import train_step  # noqa: E402
from pocketlm.train.optim import build_adamw  # noqa: E402
from pocketlm.train.plan import estimate, plan  # noqa: E402
from pocketlm.train.precision import Precision  # noqa: E402
from pocketlm.train.prefetch import pinned  # noqa: E402


def synthetic_batch(B: int, T: int, V: int, docs_per_row: int, gen: torch.Generator) -> dict:
    """Random tokens in rows of `docs_per_row` packed documents (positions restart, doc ids change)."""
    x = torch.randint(5, V, (B, T), generator=gen)
    y = torch.randint(5, V, (B, T), generator=gen)
    doc_len = max(1, T // docs_per_row)
    idx = torch.arange(T)
    doc_ids = (idx // doc_len).expand(B, T).contiguous()
    positions = (idx % doc_len).expand(B, T).contiguous()
    return {"x": x, "y": y, "positions": positions, "doc_ids": doc_ids}


def fix_mmap_threshold() -> None:
    """glibc: allocations of 128 KiB and more each get their own mapping, for the whole process."""
    if sys.platform == "linux":
        M_MMAP_THRESHOLD = -3
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)


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


def hf_step(model, opt, batch: dict, prec: Precision, device: torch.device) -> torch.Tensor:
    """The peer's training step: the same autocast, clipping and fused AdamW as train_step."""
    with prec.autocast():
        loss = model(input_ids=batch["x"].to(device, non_blocking=True),
                     labels=batch["y"].to(device, non_blocking=True)).loss
    prec.scaler.scale(loss).backward()
    prec.scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    prec.scaler.step(opt)
    prec.scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def make_step(mode: str, cfg: GPTConfig, B: int, T: int, device: torch.device):
    """The model, optimizer and batch of one mode, and a function that runs one training step on them."""
    peer = mode.startswith("hf:")
    precision, *extras = mode.removeprefix("hf:").split("+")
    compiled, math_attention = "compile" in extras, "math" in extras
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if peer:
        model = hf_llama(model)
    opt = build_adamw(model, 1e-4, 0.1, 0.95, device)
    prec = Precision.create(device, precision)
    if compiled and not peer:
        model.use_flex_attention("sdpa" not in extras)
    step_model = torch.compile(model) if compiled else model
    if "logits" in extras:  # the loss through materialised fp32 logits, as before the chunked loss
        inner = step_model
        step_model = lambda *a, **k: inner(*a, **{**k, "return_logits": True})  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(B, T, cfg.vocab_size, 4, gen)
    if device.type == "cuda":
        batch = pinned([batch])[0]
    # "+math" forces the math attention kernel, which stores the attention pattern as MPS does.
    def attention() -> contextlib.AbstractContextManager:
        return sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    def one_step() -> torch.Tensor:
        with attention():
            if peer:
                return hf_step(step_model, opt, batch, prec, device)
            return train_step(step_model, opt, [batch], prec, 1.0, device, DistInfo())[0]
    return one_step


def run_mode(mode: str, cfg: GPTConfig, B: int, T: int, steps: int, device: torch.device) -> dict:
    precision, *extras = mode.removeprefix("hf:").split("+")
    compiled, math_attention = "compile" in extras, "math" in extras
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if device.type == "cpu":
        warm_up_kernels(device)
    rss0 = reset_peak_rss()
    one_step = make_step(mode, cfg, B, T, device)
    for _ in range(2):  # warm-up: optimizer state allocation, compilation
        float(one_step())
    t0 = time.perf_counter()
    for _ in range(steps):  # no host sync inside: the step is timed as training runs it
        loss = one_step()
    float(loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss() - rss0
    pred = estimate(cfg, B, T, precision, "mps" if math_attention else device.type, checkpointing=False,
                    compiled=compiled or "logits" in extras).live
    del one_step
    return {"mode": mode, "micro_batch": B, "seq_len": T, "tok_per_s": B * T / dt, "ms_per_step": 1000 * dt,
            "peak_bytes": peak, "predicted_bytes": pred, "ratio": peak / pred, "loss": float(loss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"))
    ap.add_argument("--modes", nargs="+", default=["bf16", "fp16", "bf16+compile"],
                    help="fp32 | bf16 | fp16, optionally +compile and/or +math (MPS-like attention)")
    ap.add_argument("--micro-batch", type=int, help="rows per step (default: the plan for a 16 GB Mac)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all modes (interleaved); min/median/max")
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-embd", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--json", action="store_true", help="one JSON line per mode instead of a table")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results.jsonl")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        fix_mmap_threshold()
    overrides = {k: v for k in ("n_layer", "n_embd", "n_head", "vocab_size") if (v := getattr(args, k)) is not None}
    cfg = GPTConfig.v1(**overrides)
    B = args.micro_batch or plan(cfg, args.seq_len, "mps", 16 << 30, 65536).micro_batch
    device = torch.device(args.device)
    if not args.json:
        print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}, "
              f"torch {torch.__version__}, model {cfg}")
        print(f"{'mode':<22}{'B':>4}{'tok/s':>12}{'min':>10}{'max':>10}{'ms/step':>10}{'peak GiB':>10}{'pred GiB':>10}")
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for _ in range(args.repeats):  # modes interleaved, so a noisy neighbour hits all of them alike
        for mode in args.modes:
            runs[mode].append(run_mode(mode, cfg, B, args.seq_len, args.steps, device))
    rows = []
    for mode, rs in runs.items():
        speeds = sorted(r["tok_per_s"] for r in rs)
        r = {**rs[-1], "tok_per_s": statistics.median(speeds), "tok_per_s_min": speeds[0],
             "tok_per_s_max": speeds[-1], "repeats": len(rs), "model": "hf_llama" if mode.startswith("hf:") else
             "pocketlm", "shape": {k: getattr(cfg, k) for k in ("vocab_size", "n_layer", "n_head", "n_embd")}}
        rows.append(r)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{mode:<22}{B:>4}{r['tok_per_s']:>12,.0f}{speeds[0]:>10,.0f}{speeds[-1]:>10,.0f}"
                  f"{r['ms_per_step']:>10.1f}{r['peak_bytes'] / 2**30:>10.2f}{r['predicted_bytes'] / 2**30:>10.2f}")
    by_mode = {r["mode"]: r["tok_per_s"] for r in rows}
    for mode, speed in by_mode.items():  # each pocketlm mode against the peer in the same precision mode
        peer = by_mode.get("hf:" + mode.replace("+sdpa", "").replace("+logits", ""))
        if not mode.startswith("hf:") and peer:
            print(f"{mode}: {speed / peer:.2f}x HF")
    if not args.no_record:
        results.append("train_step", device, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
