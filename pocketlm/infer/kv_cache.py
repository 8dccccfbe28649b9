"""KVCache: preallocated keys and values for every layer, filled by prefill and extended by decode.

Owns only storage and the write position; the model decides masking and RoPE positions from `pos`.
`pos` is a Python int so that reading it never synchronises with the device.
"""

from __future__ import annotations

import torch

from pocketlm import PocketLMError
from pocketlm.model.config import GPTConfig


class KVCache:
    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim)
        # One tensor per kind for all layers: (L, B, H, max_len, D); k[layer] is a (B, H, max_len, D) view.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # tokens cached so far; advanced once per forward, after all layers have written

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, S, D) at [pos, pos+S) and return views of this layer's K/V up to pos+S."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise PocketLMError(f"KV cache full: {self.pos} cached + {k.shape[2]} new > max_len {self.max_len}; "
                                "allocate a longer cache or stop generating at the length limit")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        """Forget the cached tokens; the storage is kept (stale values beyond pos are never read)."""
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
