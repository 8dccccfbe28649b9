"""The SFT phase: packed conversations, loss on assistant tokens only (the cache stores the mask).

It starts from a model folder (the pretrain phase's best/ unless told otherwise) with a fresh optimizer;
best/ is judged by the pooled assistant-token validation loss of the SFT sources.
"""

from __future__ import annotations

from pathlib import Path

from pocketlm import PocketLMError
from pocketlm.cache.dataset import SFTData
from pocketlm.tokenizer.chat_template import format_chat_tokens
from pocketlm.train.config import TrainConfig
from pocketlm.train.loop import Phase
from pocketlm.train.pretrain import parse_mix, val_sets

PROMPTS = ("What is the capital of France?", "Give me three tips for staying focused.", "Who are you?")


def sft_phase(cfg: TrainConfig, tok, log=print) -> Phase:
    cache = Path(cfg.cache)
    mix = parse_mix(cfg.sft_sources, "sft_sources")
    train = SFTData(cache, mix, cfg.seq_len, cfg.seed, "train", tokenizer_hash=tok.hash, pack=cfg.sft_pack)
    sources = val_sets(cache, list(mix), "sft", cfg.seq_len, log)
    if not sources:
        raise PocketLMError(f"{cache}: none of the SFT sources {', '.join(mix)} has a validation split; "
                            "rebuild the cache with a larger val_fraction or more conversations")
    val = {s: SFTData(cache, [s], cfg.seq_len, cfg.seed, "val", verify="size") for s in sources}
    prompts = [format_chat_tokens(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    return Phase("sft", cfg.sft_steps, cfg.sft_lr, train, val, tuple(sources), prompts)
