"""GPTConfig: the shape of the model, with the v1 defaults and a tiny preset for tests.

Pure Python (no torch import), so the CLI can build flags from it without loading torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pocketlm import PocketLMError


def swiglu_hidden(n_embd: int, multiple_of: int = 64) -> int:
    """SwiGLU hidden size: 8/3·C (same parameters as a 4·C GELU MLP), rounded up to a multiple of 64.

    64 keeps the GEMMs tile-friendly on every backend; C=512 gives 1408.
    """
    hidden = -(-8 * n_embd // 3)  # ceil(8C/3) in integers
    return -(-hidden // multiple_of) * multiple_of


@dataclass
class GPTConfig:
    vocab_size: int = field(default=16000, metadata={"help": "token ids the model can read and predict"})
    block_size: int = field(default=1024, metadata={"help": "context length the RoPE table is built for"})
    n_layer: int = field(default=8, metadata={"help": "transformer blocks"})
    n_head: int = field(default=8, metadata={"help": "attention heads (head_dim = n_embd / n_head)"})
    n_embd: int = field(default=512, metadata={"help": "residual stream width C"})
    ffn_hidden: int | None = field(default=None,
                                   metadata={"help": "SwiGLU hidden size; unset: 8/3·C rounded up to 64"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency"})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    init_std: float = field(default=0.02,
                            metadata={"help": "std of the normal init; residual projections get /sqrt(2L)"})
    qk_norm: bool = field(default=False, metadata={"help": "RMSNorm on each head's queries and keys before RoPE "
                                                         "(not exportable to a plain Llama)"})

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            self.ffn_hidden = swiglu_hidden(self.n_embd)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_hidden"):
            if getattr(self, name) <= 0:
                raise PocketLMError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise PocketLMError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise PocketLMError(f"GPTConfig: head_dim={self.head_dim} must be even for RoPE; change n_embd or n_head")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def v1(cls, **overrides: Any) -> GPTConfig:
        """The v1 model: 33,890,816 parameters."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, vocab_size: int = 512, **overrides: Any) -> GPTConfig:
        """A model small enough for unit tests on a shared 2-core CPU."""
        values: dict[str, Any] = dict(vocab_size=vocab_size, block_size=128, n_layer=2, n_head=4, n_embd=64)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
