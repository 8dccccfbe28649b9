"""Where a training step's or a decoded token's time goes: torch.profiler over a few steps, kernels
grouped by kind, beside the wall time (the difference is the device waiting for the host).

    python bench/profile_step.py --device cuda --what train --mode bf16+compile --micro-batch 32
    python bench/profile_step.py --device cuda --what decode --row graph+stats --dtype bf16
    python bench/profile_step.py --device cpu --what decode --row gen --threads 2

Train modes are bench/train_step.py's, decode rows bench/decode.py's. On CUDA the groups are device
kernel time; on the CPU they are operator self time on the host.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results  # noqa: E402
from bench.decode import sync, via_generate  # noqa: E402
from pocketlm.infer.op_count import IdTokens, decode_op_counts  # noqa: E402
from bench.train_step import make_step  # noqa: E402
from pocketlm.infer.config import StatsRequest  # noqa: E402
from pocketlm.model import GPT, GPTConfig  # noqa: E402

# First match wins; device kernel names (cuBLAS/CUTLASS/flash/triton) and host operator names alike.
GROUPS = (
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|aten::mm|aten::addmm|aten::bmm|aten::linear|aten::matmul"),
    ("attention", r"flash|fmha|attention|flex|sdpa|efficient"),
    ("optimizer", r"adam|foreach|muon|newton"),
    ("loss", r"cross_entropy|log_softmax|nll_loss|softmax"),
    ("compiled (triton)", r"^triton_"),
    ("copy / fill", r"memcpy|memset|copy_|fill_|to_copy|cat|index"),
)


def group_of(name: str) -> str:
    return next((g for g, pat in GROUPS if re.search(pat, name, re.IGNORECASE)), "other")


def profile_calls(fn, calls: int, device: torch.device) -> tuple[dict, list[tuple[str, float, int]], float]:
    """Per call: ms by group and the top operators/kernels (name, ms, count), and profiled wall ms."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3 / calls
    on_device = device.type == "cuda"
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        us = ev.self_device_time_total if on_device else ev.self_cpu_time_total
        if us <= 0 or (on_device and ev.device_type != torch.autograd.DeviceType.CUDA):
            continue
        by_name[ev.key][0] += us / 1e3 / calls
        by_name[ev.key][1] += ev.count
    groups: dict[str, float] = defaultdict(float)
    for name, (ms, _) in by_name.items():
        groups[group_of(name)] += ms
    top = sorted(((n, ms, c // calls) for n, (ms, c) in by_name.items()), key=lambda r: -r[1])[:15]
    return dict(groups), top, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--what", default="train", choices=("train", "decode"))
    ap.add_argument("--mode", default="bf16+compile", help="train: a bench/train_step.py mode")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--row", default="graph+stats", choices=("gen", "gen+stats", "graph", "graph+stats"),
                    help="decode: a bench/decode.py row")
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--new-tokens", type=int, default=256, help="decode: per call (prefill is amortised over them)")
    ap.add_argument("--calls", type=int, default=5, help="profiled steps (train) or generate() calls (decode)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = GPTConfig.v1()
    if args.what == "train":
        fn = make_step(args.mode, cfg, args.micro_batch, args.seq_len, device)
        per, label = 1, f"train {args.mode} B={args.micro_batch} T={args.seq_len}"
    else:
        torch.manual_seed(0)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        model = GPT(cfg).to(device).eval().to(dtype)
        tok = IdTokens(cfg.vocab_size)
        prompt = list(range(5, 133))
        stats = StatsRequest() if args.row.endswith("+stats") else None
        accel = args.row.startswith("graph")
        fn = lambda: via_generate(model, tok, prompt, args.new_tokens, stats, accel=accel)  # noqa: E731
        per, label = args.new_tokens, f"decode {args.row} {args.dtype}"
    t0 = time.perf_counter()
    for _ in range(2):  # warm-up: compilation, graph capture, allocator
        fn()
    sync(device)
    warm = time.perf_counter() - t0
    groups, top, wall = profile_calls(fn, args.calls, device)
    unit = "step" if per == 1 else "token"
    busy = sum(groups.values())
    print(f"{results.device_label(device)}, torch {torch.__version__}: {label}; warm-up {warm:.1f} s")
    print(f"wall {wall / per:.3f} ms/{unit} (profiled); {'device busy' if device.type == 'cuda' else 'host op time'}"
          f" {busy / per:.3f} ms/{unit} ({busy / wall:.0%} of wall)")
    print(f"{'group':<20}{'ms/' + unit:>12}{'share':>8}")
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{g:<20}{ms / per:>12.3f}{ms / busy:>8.1%}")
    print(f"{'top':<80}{'ms/' + unit:>10}{'calls':>7}")
    for name, ms, count in top:
        print(f"{name[:79]:<80}{ms / per:>10.3f}{count / per:>7.1f}")
    row = {"what": args.what, "label": label, "wall_ms": wall / per, "busy_ms": busy / per,
           "groups_ms": {g: ms / per for g, ms in groups.items()},
           "top": [{"name": n[:120], "ms": ms / per, "calls": c / per} for n, ms, c in top[:10]]}
    if args.what == "decode" and not accel:
        # What a token asks of the host beside its GEMVs: aten ops dispatched and host reads
        # (infer/op_count.py), and on the CPU the op time outside the GEMMs and attention.
        counts = decode_op_counts(model, tok, prompt, 16, stats)
        row["ops_per_token"] = counts["ops_per_token"]
        row["host_reads_per_token"] = counts["host_reads_per_token"]
        gemm, attn = groups.get("gemm", 0.0) / per, groups.get("attention", 0.0) / per
        print(f"per token: {counts['ops_per_token']:.0f} aten ops, {counts['host_reads_per_token']:.0f} host reads;"
              f" GEMM {gemm:.3f} ms, attention {attn:.3f} ms, everything else {wall / per - gemm - attn:.3f} ms"
              " (wall minus both: the other ops, dispatch and Python)")
    if not args.no_record:
        results.append("profile_step", device, [row])
    print(json.dumps(row))


if __name__ == "__main__":
    main()
