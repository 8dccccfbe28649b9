"""What one decoded token asks of the device, counted: aten ops, copies (and the bytes they move), and
host reads (the host waiting for device values).

The CPU cannot time an Apple GPU, but it can count what a decode step dispatches. Run under the
MPS-rules mode (`pocketlm.mps_rules.MPSRules`), the MPS branches are what runs, and the mode's idea of
which tensors live on the device tells host reads from host work: so the counts on a CPU are the
counts of an MPS decode step. `pocketlm doctor` reports them; tests hold the decode path to them.

- ops: every aten op dispatched (one kernel launch or more on a GPU, each with a fixed cost that
  dominates a small model's decode step);
- copies: `copy_`, `clone`, `_to_copy` and `contiguous` of a tensor that is not (what `.contiguous()`,
  `.to()` and cache writes dispatch) and the bytes of their outputs;
- host reads: `.tolist()`, `.item()`, `.cpu()`, `.numpy()` of a device tensor (each one a sync: the
  host waits for the device's queue to drain).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pocketlm import mps_rules

COPY_OPS = frozenset({"copy_", "clone", "_to_copy", "contiguous"})
_READS = ("tolist", "item", "cpu", "numpy")


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type != "cpu" or (mps_rules.active() and mps_rules.on_device(t))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops of this thread (dispatch modes are per thread) and host reads while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.copies = 0
        self.copy_bytes = 0
        self.host_reads = 0
        self._saved: dict[str, Callable] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        # contiguous() of a tensor that already is one returns it: no copy.
        if name in COPY_OPS and not (name == "contiguous" and out is args[0]):
            self.copies += 1
            self.copy_bytes += sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out

    def __enter__(self) -> OpCounter:
        for name in _READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(t: torch.Tensor, *args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                if _on_device(t):
                    self.host_reads += 1
                return _original(t, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def decode_op_counts(model: torch.nn.Module, tok, prompt_ids: list[int], n_tokens: int = 8,
                     stats=None, temperature: float = 0.0) -> dict[str, Any]:
    """Decode n_tokens + 1 tokens after `prompt_ids` (greedy by default; seeded sampling otherwise) and
    count the steps after the first (whose forward is the prefill): per-token ops, copies, copy bytes
    and host reads, the ops by name, and the KV length they were counted from."""
    from pocketlm.infer.generate import generate
    from pocketlm.infer.sampling import GenConfig

    gen = generate(model, tok, prompt_ids, GenConfig(max_new_tokens=n_tokens + 1, temperature=temperature, seed=0), stats=stats,
                   accel=False)
    first = next(gen)  # the prefill and the first token, not counted (nor the graph capture, were it taken)
    counter = OpCounter()
    steps = 0
    with counter:
        for _ in gen:
            steps += 1
    if steps == 0:
        raise ValueError("the generation stopped after its first token; nothing to count")
    return {"tokens": steps, "kv_len_from": first.cache_len + 1, "ops_per_token": counter.total / steps,
            "copies_per_token": counter.copies / steps, "copy_bytes_per_token": counter.copy_bytes / steps,
            "host_reads_per_token": counter.host_reads / steps,
            "ops": {k: v / steps for k, v in sorted(counter.ops.items(), key=lambda kv: -kv[1])}}


class IdTokens:
    """A stand-in tokenizer for counting and timing a model without its tokenizer: each id decodes as
    its number, and no id ends the text (so a generation always runs to its length)."""

    eot_id = -1

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def id_to_bytes(self, i: int) -> bytes:
        return f"{i} ".encode()

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return "".join(f"{i} " for i in ids)
