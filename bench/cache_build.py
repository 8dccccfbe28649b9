"""Benchmark: token cache build throughput against raw SentencePiece encoding, on real data.

    python bench/cache_build.py --data-dir ../shared/data [--tokenizer tokenizer.model] [--take 1000] [--repeat 6]

Measures, in one run and on the same documents, after a warm-up and in interleaved rounds (best of
--rounds kept, CPU seconds beside it): (1) raw SentencePiece encoding on one core, both as its
fastest bulk call (ids as arrays) and as one `encode` per document (ids as Python lists), (2) reading
the source alone, (3) `build_cache` with --workers encoding threads, reading and writing included.
Target: build tokens/s >= 0.8 x raw tokens/s per core x cores used, against the faster raw rate, on
>= 100 MB of input: --repeat N feeds the source's real documents N times (ids made distinct), written
once to a temporary local mirror that the build reads like any other, so fixed costs do not decide it.
Other processes on the machine share the cores: compare numbers from the same run only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results  # noqa: E402
from pocketlm.cache.build_cache import build_cache  # noqa: E402
from pocketlm.data.sources import open_source  # noqa: E402

WARMUP_DOCS = 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--source", default="fineweb_edu", help="a document source (fineweb_edu reads fineweb_legal/)")
    ap.add_argument("--take", type=int, help="documents to encode (default: all of the source)")
    ap.add_argument("--tokenizer", help="tokenizer.model (default: train a 16k one on the documents first)")
    ap.add_argument("--workers", type=int, default=0, help="encoding threads (default: the build's own, 0)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1,
                    help="feed the documents this many times (distinct ids), e.g. 6 for >= 100 MB of fineweb")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results.jsonl")
    args = ap.parse_args()
    if args.repeat > 1 and args.source != "fineweb_edu":
        ap.error("--repeat writes a fineweb_edu mirror: use it with --source fineweb_edu")
    spec = f"{args.source}:take={args.take}" if args.take else args.source
    records = list(open_source(spec, data_dir=args.data_dir))
    texts = [r["text"] for r in records] * args.repeat
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        if args.repeat > 1:
            args.data_dir, spec = _repeated_mirror(records, args.repeat, Path(tmp) / "data"), "fineweb_edu"
        tok_path = args.tokenizer or _train(texts, Path(tmp) / "tok")
        sp = spm.SentencePieceProcessor(model_file=str(tok_path))
        out = Path(tmp) / "cache"
        # The build's main thread reads and writes beside the encoding threads: it counts as a core too.
        cores = min(args.workers + 1, os.cpu_count() or 1) if args.workers else os.cpu_count() or 1

        def raw_bulk() -> int:
            return sum(len(ids) for ids in sp.encode(texts, return_type="numpy", num_threads=1))

        def raw_parallel() -> int:
            return sum(len(ids) for ids in sp.encode(texts, return_type="numpy", num_threads=cores))

        def raw_per_doc() -> int:
            return sum(len(sp.encode(t)) for t in texts)

        def read() -> int:
            return sum(1 for _ in open_source(spec, data_dir=args.data_dir))

        def build() -> int:
            meta = build_cache(tok_path, [(spec, "pretrain")], out, data_dir=args.data_dir,
                               workers=args.workers, progress=False)
            return sum(c["tokens"] for c in meta["sources"][spec.split(":")[0]]["counts"].values())

        sp.encode(texts[:WARMUP_DOCS], return_type="numpy", num_threads=1)
        build_cache(tok_path, [(f"{spec.split(':')[0]}:take={WARMUP_DOCS}", "pretrain")], out,
                    data_dir=args.data_dir, workers=args.workers, progress=False)
        best: dict[str, tuple[int, float, float]] = {}
        for _ in range(args.rounds):  # interleaved, so a busy spell on the machine hits every measurement
            for name, fn in (("bulk", raw_bulk), ("per_doc", raw_per_doc), ("parallel", raw_parallel),
                             ("read", read), ("build", build)):
                n, wall, cpu = _timed(fn)
                if name not in best or wall < best[name][1]:
                    best[name] = (n, wall, cpu)
    rate = {k: n / wall for k, (n, wall, _) in best.items()}
    fast = max(("bulk", "per_doc"), key=rate.__getitem__)
    print(f"documents: {len(texts):,} ({n_bytes / 1e6:.1f} MB of text) from {spec}"
          f"{f' (x{args.repeat})' if args.repeat > 1 else ''}; cores: {os.cpu_count()}, "
          f"build workers: {args.workers or 'default'}; best of {args.rounds} rounds (wall s, CPU s)")
    _line("raw encode, 1 core, bulk (arrays)", best["bulk"], "tok")
    _line("raw encode, 1 core, per document", best["per_doc"], "tok")
    _line(f"raw encode, bulk on {cores} threads", best["parallel"], "tok")
    _line("reading the source alone", best["read"], "doc")
    _line(f"cache build, {args.workers or 'default'} worker(s)", best["build"], "tok")
    print(f"  (build tokens include {len(texts):,} <|eot|>; the build includes reading and writing)")
    for label, base in (("bulk", rate["bulk"]), ("per document", rate["per_doc"])):
        print(f"build / (raw {label} per core x {cores} cores) = {rate['build'] / (base * cores):.2f}")
    # What `cores` threads of raw encoding reach right now: the ceiling when others share the cores.
    print(f"build / (raw bulk on {cores} threads) = {rate['build'] / rate['parallel']:.2f}")
    target = 0.8 * rate[fast] * cores
    print(f"target >= 0.80 of the faster raw rate x {cores} = {target:,.0f} tok/s: "
          f"{'met' if rate['build'] >= target else 'not met'}")
    # CPU seconds do not depend on how busy the machine is: on idle cores, wall = CPU / cores at best.
    raw_cpu, read_cpu, build_cpu = best[fast][2], best["read"][2], best["build"][2]
    print(f"CPU seconds: raw encode {raw_cpu:.2f}, reading {read_cpu:.2f}, build {build_cpu:.2f}; "
          f"build beyond encode + read: {build_cpu - raw_cpu - read_cpu:+.2f}; "
          f"best ratio the CPU time allows: {raw_cpu / build_cpu:.2f}")
    if not args.no_record:
        row = {"source": args.source, "take": args.take, "repeat": args.repeat, "documents": len(texts),
               "text_mb": round(n_bytes / 1e6, 1), "workers": args.workers, "cores": cores, "rounds": args.rounds,
               "tok_per_s": {k: round(v) for k, v in rate.items()},
               "wall_s": {k: round(w, 3) for k, (_, w, _) in best.items()},
               "cpu_s": {k: round(c, 3) for k, (_, _, c) in best.items()},
               "ratio_vs_raw_x_cores": round(rate["build"] / (rate[fast] * cores), 3),
               "ratio_vs_raw_parallel": round(rate["build"] / rate["parallel"], 3), "target": 0.8}
        results.append("cache_build", torch.device("cpu"), [row])


def _repeated_mirror(records: list[dict], repeat: int, data_dir: Path) -> Path:
    """A local fineweb_edu mirror holding the records `repeat` times, each copy with its own id."""
    folder = data_dir / "fineweb_edu"
    folder.mkdir(parents=True)
    with open(folder / "repeated.jsonl", "w", encoding="utf-8") as f:
        for k in range(repeat):
            for r in records:
                f.write(json.dumps({"id": f"{r['id']}#{k}", "text": r["text"], **r["meta"]}) + "\n")
    return data_dir


def _timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    """(result, wall s, CPU s of this process's threads and of its finished child processes)."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    n = fn()
    return n, time.perf_counter() - t0, _cpu_seconds() - c0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _line(label: str, measured: tuple[int, float, float], unit: str) -> None:
    n, wall, cpu = measured
    print(f"{label:36s} {n:>11,} {unit}s in {wall:5.2f} s (CPU {cpu:5.2f} s) = {n / wall:>11,.0f} {unit}/s")


def _train(texts: list[str], out: Path) -> Path:
    from pocketlm.tokenizer.tokenizer_sp import train_tokenizer

    return train_tokenizer(texts, vocab_size=16000, out_dir=out, max_sentences=50_000)


if __name__ == "__main__":
    main()
