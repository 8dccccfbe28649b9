"""Defaults of the cache stage, in one place and importable without numpy or torch (the CLI builds
its flags from them): the build's settings (`CacheConfig`) and the pretrain mixture batches are
drawn by when none is given."""

from __future__ import annotations

from dataclasses import dataclass, field

# The recipe's pretrain mixture; `TrainConfig.pretrain_mix` spells the same weights as SOURCE=WEIGHT.
DEFAULT_MIXTURE = {"fineweb_edu": 0.95, "roam": 0.05}


@dataclass
class CacheConfig:
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.model to encode with (required)"})
    pretrain: tuple[str, ...] = field(default=(), metadata={"help": "document source specs, e.g. roam:take=500"})
    eval: tuple[str, ...] = field(default=(), metadata={"help": "document specs kept whole for validation, e.g. wikitext"})
    sft: tuple[str, ...] = field(default=(), metadata={"help": "chat source specs, e.g. dolly:take=1000"})
    out: str | None = field(default=None, metadata={"help": "cache folder to write (required)"})
    data_dir: str | None = field(default=None, metadata={"help": "local data mirror (default: the hub)"})
    seed: int = field(default=0, metadata={"help": "default seed of the datasets read from this cache"})
    val_fraction: float = field(default=0.02, metadata={"help": "share of documents held out for validation"})
    workers: int = field(default=0, metadata={"help": "tokenizer threads (0 = one per core, plus one)"})
    shard_tokens: int = field(default=1 << 24, metadata={"help": "tokens per shard before a new one starts"})
    sft_mask: str = field(default="assistant", metadata={"help": "sft loss on: assistant | all"})
