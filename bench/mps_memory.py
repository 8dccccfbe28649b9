"""What one training micro-batch keeps for backward on an Apple GPU, emulated on the CPU.

With grad enabled MPS has no fused attention: SDPA runs its math path, which upcasts fp16 q/k/v to fp32
and keeps the fp32 T x T probabilities for backward. The CPU reproduces that path with fp16 autocast
and `sdpa_kernel(SDPBackend.MATH)`. `saved_bytes` runs one training forward under
`torch.autograd.graph.saved_tensors_hooks` and counts the unique storages autograd keeps (parameters
and autocast's copies of them excluded: the planner counts those as static memory). No backward is
needed for that count. The plain CPU path (fp32, the flash CPU kernel with the document mask) is
measured the same way. Each count runs on real tensors (minutes at the v1 shape on a loaded 2-core
CPU) and under FakeTensorMode (seconds; what tests/test_plan.py uses), and the two must agree.

    python bench/mps_memory.py                     # v1, T=1024, 1 and 2 rows: planner vs measured
    python bench/mps_memory.py --micro-batch 4 --no-record
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pocketlm.model import GPT, GPTConfig  # noqa: E402

PATHS = ("mps", "cpu")  # the MPS emulation (fp16 autocast, math attention) and plain CPU fp32


def packed_batch(B: int, T: int, V: int, docs_per_row: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens in rows of packed documents (positions restart, doc ids change), as training reads."""
    gen = torch.Generator().manual_seed(seed)
    doc_len = max(1, T // docs_per_row)
    idx = torch.arange(T)
    return {"x": torch.randint(5, V, (B, T), generator=gen), "y": torch.randint(5, V, (B, T), generator=gen),
            "positions": (idx % doc_len).expand(B, T).contiguous(),
            "doc_ids": (idx // doc_len).expand(B, T).contiguous()}


@contextlib.contextmanager
def emulate(path: str) -> Iterator[None]:
    """The attention and autocast a training step takes on `path` ("mps" or "cpu")."""
    if path == "cpu":
        yield
        return
    with torch.autocast("cpu", dtype=torch.float16), sdpa_kernel(SDPBackend.MATH):
        yield


# Ops autograd records for views: a saved view of a parameter's cast shares the cast's storage.
_VIEWS = {"TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0", "UnsafeViewBackward0",
          "ReshapeAliasBackward0", "ExpandBackward0"}


def _is_weight_copy(t: torch.Tensor, params: set[int]) -> bool:
    """Autocast's cast of a parameter, or a view of one: ToCopyBackward0 (after views) straight from the
    parameter's AccumulateGrad. The planner counts these copies as static memory."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEWS:
        fn = fn.next_functions[0][0]
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    src = fn.next_functions[0][0]
    return src is not None and id(getattr(src, "variable", None)) in params


def saved_bytes(model: GPT, batch: dict[str, torch.Tensor], path: str) -> int:
    """Bytes of the unique storages autograd keeps for backward after one training forward (loss only,
    as the loop runs it) on `path`; parameters and autocast's copies of them are not counted."""
    params = {id(p) for p in model.parameters()}
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata  # the storage itself: views of one tensor count once
        if key not in param_storages and not _is_weight_copy(t, params):
            kept[key] = t.untyped_storage().nbytes()
        return t

    with emulate(path), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(batch["x"], batch["y"], positions=batch["positions"], doc_ids=batch["doc_ids"],
                        return_logits=False)
    del loss
    return sum(kept.values())


def measure(cfg: GPTConfig, micro_batch: int, seq_len: int, path: str, fake: bool = True) -> int:
    """`saved_bytes` of a fresh model on packed rows. fake: under FakeTensorMode, which dispatches every op
    (autocast, the SDPA backend choice, what autograd saves) without computing: the same count in seconds
    instead of minutes at the v1 shape (the bench checks both agree)."""
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        torch.manual_seed(0)
        model = GPT(cfg)
        return saved_bytes(model, packed_batch(micro_batch, seq_len, cfg.vocab_size), path)


def main() -> None:
    from bench import results
    from pocketlm.train.plan import OVERHEAD, estimate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[1, 2], help="rows (v1 shape)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results.jsonl")
    args = ap.parse_args()
    cfg = GPTConfig.v1()
    T, gib, rows = args.seq_len, 1 << 30, []
    for B in args.micro_batch:
        for path in PATHS:
            measured = measure(cfg, B, T, path, fake=False)
            fake = measure(cfg, B, T, path, fake=True)
            e = estimate(cfg, B, T, "fp16" if path == "mps" else "fp32", path, False, compiled=False)
            print(f"{path:4s} B={B} T={T}: saved {measured / gib:.3f} GiB measured ({fake / gib:.3f} under fake "
                  f"tensors), {e.saved / gib:.3f} GiB planned (x{e.saved / measured:.3f}); planned peak with the "
                  f"backward {e.live / gib:.2f} GiB (x{OVERHEAD} allocator: {e.total / gib:.2f})")
            rows.append({"path": path, "micro_batch": B, "seq_len": T, "saved_bytes": measured,
                         "saved_bytes_fake": fake, "planned_saved_bytes": e.saved, "planned_live_bytes": e.live,
                         "ratio": round(e.saved / measured, 4)})
    if not args.no_record:
        results.append("mps_memory", torch.device("cpu"), rows)


if __name__ == "__main__":
    main()
