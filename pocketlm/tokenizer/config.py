"""TokenizerTrainConfig: how `pocketlm tokenizer train` trains, defaults in one place.

Pure Python (no sentencepiece or numpy import), so the CLI can build flags from it; `train_tokenizer`
takes its keyword defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenizerTrainConfig:
    vocab_size: int = field(default=16000, metadata={"help": "pieces in the vocabulary"})
    # At most 2 KB per chunk, so at most ~100 MB of text: training costs ~2 CPU-seconds and ~35 MB of
    # RAM per MB of text.
    max_sentences: int = field(
        default=50_000, metadata={"help": "cap on training chunks (<= 2 KB each); more are sampled with the seed"})
    seed: int = field(default=0, metadata={"help": "seed of the chunk sample"})
    holdout_every: int = field(
        default=50, metadata={"help": "every Nth document of the first source is held out to measure bytes/token"})
