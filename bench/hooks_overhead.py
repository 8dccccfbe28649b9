"""What do empty hook points cost? Forward time with HookPoints present but unhooked, vs the same model
with every HookPoint call replaced by a bare `return x`.

Measures a full-sequence forward (training/prefill shape) and single-token cached decode, where the
fixed per-call overhead weighs most. Prints median times and the ratio hooked / plain.

    python bench/hooks_overhead.py --preset v1 --seq 256 --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from pocketlm.model.kv_cache import KVCache
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.hooks import HookPoint


@contextlib.contextmanager
def plain_identity_hooks() -> Iterator[None]:
    """Python looks special methods up on the type, so this replaces every hook point's call at once."""
    original = HookPoint.__call__
    HookPoint.__call__ = lambda self, x: x  # type: ignore[method-assign]
    try:
        yield
    finally:
        HookPoint.__call__ = original  # type: ignore[method-assign]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def median_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    fn()  # warm-up: allocator, kernel selection
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["v1", "tiny"], default="v1")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256, help="tokens in the full forward")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = GPTConfig.v1() if args.preset == "v1" else GPTConfig.tiny()
    model = GPT(cfg).to(device).eval()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    cache = KVCache(cfg, args.batch, args.seq + 1, device, torch.float32)

    def full() -> object:
        return model(idx)

    def decode() -> object:
        cache.pos = args.seq  # one new token after a full cache, the same work every call
        return model(idx[:, :1], cache=cache)

    print(f"{args.preset} on {device}, batch {args.batch}, {len(model.hook_names())} hook points, "
          f"{torch.get_num_threads()} CPU threads")
    with torch.inference_mode():
        for name, fn in [(f"forward T={args.seq}", full), (f"decode 1 token after {args.seq}", decode)]:
            # Alternate the two variants so drifting machine load hits both alike.
            hooked, plain = [], []
            for _ in range(3):
                hooked.append(median_ms(fn, device, args.iters))
                with plain_identity_hooks():
                    plain.append(median_ms(fn, device, args.iters))
            h, p = min(hooked), min(plain)
            print(f"{name:>28}: hooks present {h:8.3f} ms | plain identity {p:8.3f} ms | ratio {h / p:.3f}")


if __name__ == "__main__":
    main()
