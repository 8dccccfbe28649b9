"""KVCache: preallocated keys and values for every layer, filled by prefill and extended by decode.

Part of the model's forward contract: `GPT.forward(..., cache=cache)` writes the new tokens' keys and
values and reads the earlier ones. The cache owns only storage and the write position; the model
decides masking and RoPE positions from it.

Two ways to address it:
- `pos`, a Python int (the default): reading it never synchronises with the device, and the model
  attends to exactly `pos + S` keys.
- `position`, the same number held on the device, used once `static` is set: one new token is written
  at `position` and attends to every slot, those past it masked. Nothing in such a forward depends
  on a host value, so it can be captured once in a CUDA graph and replayed for every token
  (`infer/graph_decode.py`). The graph's owner advances `pos` on the host beside it.
"""

from __future__ import annotations

import torch

from pocketlm import PocketLMError
from pocketlm.model.config import GPTConfig


class KVCache:
    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim)
        # One tensor per layer and kind, (B, H, max_len, D) each, not views of one (L, ...) tensor: a compiled
        # static step writes each layer's new token in place only when that layer's cache is a tensor of its
        # own. As views of one base, inductor rewrote the whole base for every layer's write (8 copies of the
        # full cache per token: the compiled CPU decode ran 4-5x slower than eager; docs/LOG.md).
        self.k = [torch.zeros(shape[1:], device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape[1:], device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0  # tokens cached so far; advanced once per forward, after all layers have written
        self.static = False  # True: address by the device-side `position` (one token per forward)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, S, D) at [pos, pos+S) and return views of this layer's K/V up to pos+S.

        Static: write the one new token at `position` and return all max_len slots.
        """
        if self.static:
            self.k[layer].index_copy_(2, self.position, k)
            self.v[layer].index_copy_(2, self.position, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise PocketLMError(f"KV cache full: {self.pos} cached + {k.shape[2]} new > max_len {self.max_len}; "
                                "allocate a longer cache or stop generating at the length limit")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def static_mask(self) -> torch.Tensor:
        """(1, 1, 1, max_len) boolean: the slots the token at `position` may attend to."""
        return (self.slots <= self.position).view(1, 1, 1, -1)

    def advance(self, n: int) -> None:
        """Count n more cached tokens on the host (static forwards leave this to the graph's owner)."""
        if not self.static:
            self.pos += n

    def reset(self) -> None:
        """Forget the cached tokens; the storage is kept (stale values beyond pos are never read)."""
        self.pos = 0
        self.static = False

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)
