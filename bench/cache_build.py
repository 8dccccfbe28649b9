"""Benchmark: token cache build throughput against raw SentencePiece encoding, on real data.

    python bench/cache_build.py --data-dir ../shared/data [--tokenizer tokenizer.model] [--take 1000]

Measures, in one run and on the same documents: (1) raw `SentencePieceProcessor.encode` of each
document on one core, (2) reading the source alone, (3) `build_cache` with --workers processes.
Target: build tokens/s >= 0.8 x raw tokens/s per core x workers. Other processes on the machine
share the cores, so compare numbers from the same run only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from pocketlm.cache.build_cache import build_cache
from pocketlm.data.sources import open_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--source", default="fineweb_edu", help="a document source (fineweb_edu reads fineweb_legal/)")
    ap.add_argument("--take", type=int, help="documents to encode (default: all of the source)")
    ap.add_argument("--tokenizer", help="tokenizer.model (default: train a 16k one on the documents first)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    spec = f"{args.source}:take={args.take}" if args.take else args.source
    texts = [r["text"] for r in open_source(spec, data_dir=args.data_dir)]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = args.tokenizer or _train(texts, Path(tmp) / "tok")
        sp = spm.SentencePieceProcessor(model_file=str(tok_path))

        t0, c0 = time.perf_counter(), time.process_time()
        raw_tokens = sum(len(sp.encode(t)) for t in texts)
        raw_s, raw_cpu = time.perf_counter() - t0, time.process_time() - c0

        t0, c0 = time.perf_counter(), time.process_time()
        n_read = sum(1 for _ in open_source(spec, data_dir=args.data_dir))
        read_s, read_cpu = time.perf_counter() - t0, time.process_time() - c0

        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        meta = build_cache(tok_path, [(spec, "pretrain")], Path(tmp) / "cache", data_dir=args.data_dir,
                           workers=args.workers, progress=False)
        build_s, build_cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    counts = meta["sources"][args.source]["counts"]
    build_tokens = sum(c["tokens"] for c in counts.values())
    raw_rate, build_rate = raw_tokens / raw_s, build_tokens / build_s
    target = 0.8 * raw_rate * args.workers
    print(f"documents: {len(texts):,} ({n_bytes / 1e6:.1f} MB of text) from {spec}, cores: {os.cpu_count()}")
    print(f"raw sentencepiece encode, 1 core: {raw_tokens:,} tokens in {raw_s:.2f} s = {raw_rate:,.0f} tok/s")
    print(f"reading the source alone:         {n_read:,} docs in {read_s:.2f} s = {n_read / read_s:,.0f} docs/s")
    print(f"cache build, {args.workers} worker(s):        {build_tokens:,} tokens in {build_s:.2f} s "
          f"= {build_rate:,.0f} tok/s (includes reading and writing; + {len(texts):,} <|eot|>)")
    ratio = build_rate / (raw_rate * args.workers)
    print(f"build / (raw per core x {args.workers}) = {ratio:.2f}; target >= 0.80 ({target:,.0f} tok/s): "
          f"{'met' if build_rate >= target else 'not met'}")
    # CPU seconds do not depend on how busy the machine is: how much work the build adds to encoding.
    print(f"CPU seconds: raw encode {raw_cpu:.2f}, reading {read_cpu:.2f}, build {build_cpu:.2f} "
          f"(main + workers); build overhead beyond encode + read: {build_cpu - raw_cpu - read_cpu:+.2f} s")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the build's pool is joined on exit)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _train(texts: list[str], out: Path) -> Path:
    from pocketlm.tokenizer.tokenizer_sp import train_tokenizer

    return train_tokenizer(texts, vocab_size=16000, out_dir=out, max_sentences=50_000)


if __name__ == "__main__":
    main()
