"""The pretrain phase: random windows from the document mixture; every source also evaluated alone.

best/ is judged by the pooled validation loss of the trained sources; eval-only sources (WikiText by
default) are reported beside it, never trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pocketlm import PocketLMError
from pocketlm.cache.dataset import PretrainData, SFTData
from pocketlm.cache.shards import Cache
from pocketlm.train.config import TrainConfig
from pocketlm.train.loop import Phase

PROMPTS = ("The meaning of life is", "Once upon a time,", "The most important thing to remember about")


def parse_mix(items: tuple[str, ...], field: str = "pretrain_mix") -> dict[str, float]:
    """("fineweb_edu=0.95", "roam=0.05") -> {"fineweb_edu": 0.95, "roam": 0.05}; a bare name weighs 1."""
    mix = {}
    for item in items:
        name, _, weight = item.partition("=")
        try:
            mix[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise PocketLMError(f"TrainConfig.{field}: {item!r} is not SOURCE=WEIGHT (e.g. roam=0.05)") from None
    return mix


def val_sets(cache_dir: Path, sources: list[str], kind: str, seq_len: int, log) -> list[str]:
    """The sources whose val split is long enough to evaluate; the others are named and skipped."""
    cache = Cache(cache_dir, verify="size")
    known = cache.sources(kind)
    missing = [s for s in sources if s not in known]
    if missing:
        raise PocketLMError(f"{cache_dir}: no {kind} source(s) {', '.join(missing)} (it has {', '.join(known)}); "
                            "rebuild the cache with them or change the config")
    usable = [s for s in sources if cache.stream(s, "val").n_tokens > (seq_len if kind == "pretrain" else 0)]
    for s in sorted(set(sources) - set(usable)):
        log(f"note: {s} has too few validation tokens in {cache_dir} to evaluate; skipped")
    return usable


def pretrain_phase(cfg: TrainConfig, tok, log=print) -> Phase:
    cache = Path(cfg.cache)
    mix = parse_mix(cfg.pretrain_mix)
    train = PretrainData(cache, mix, cfg.seq_len, cfg.seed, "train", tokenizer_hash=tok.hash)
    sources = val_sets(cache, list(mix) + [s for s in cfg.eval_sources if s not in mix], "pretrain", cfg.seq_len, log)
    val = {s: PretrainData(cache, {s: 1.0}, cfg.seq_len, cfg.seed, "val", verify="size") for s in sources}
    judged = tuple(s for s in mix if s in val)
    if not judged:
        raise PocketLMError(f"{cache}: none of the pretrain sources {', '.join(mix)} has a validation split to "
                            "judge best/ by; rebuild the cache with a larger val_fraction or more data")
    if cfg.midtrain_frac > 0:
        train = midtraining(cfg, train, tok)
    return Phase("pretrain", cfg.pretrain_steps, cfg.lr, train, val, judged, [tok.encode(p) for p in PROMPTS])


class MidtrainData:
    """Pretraining batches whose last steps carry chats: from step `start` on, `share` of each batch's
    rows (rounded, at least one) come from the SFT data, the rest from the documents, as nanochat's
    midtraining teaches the chat format and ending a turn before the SFT phase."""

    def __init__(self, docs, chats, start: int, share: float) -> None:
        self.docs, self.chats, self.start, self.share = docs, chats, start, share
        self.eot_id = docs.eot_id

    def chat_rows(self, step: int, batch_size: int) -> int:
        return 0 if step < self.start else min(batch_size, max(1, round(self.share * batch_size)))

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
        k = self.chat_rows(step, batch_size)
        if k == 0:
            return self.docs.batch(step, batch_size, rank, world)
        if k == batch_size:
            return self.chats.batch(step, batch_size, rank, world)
        a, b = self.docs.batch(step, batch_size - k, rank, world), self.chats.batch(step, k, rank, world)
        out = {key: torch.cat([a[key], b[key]]) for key in ("x", "y", "positions", "doc_ids")}
        out["sources"] = list(a["sources"]) + list(b["sources"])
        return out


def midtraining(cfg: TrainConfig, docs: PretrainData, tok) -> MidtrainData:
    if not 0.0 < cfg.midtrain_frac <= 1.0:
        raise PocketLMError(f"midtrain_frac must be in [0, 1] (0 = off), got {cfg.midtrain_frac}")
    if not 0.0 < cfg.midtrain_chat_share <= 1.0:
        raise PocketLMError(f"midtrain_chat_share must be in (0, 1], got {cfg.midtrain_chat_share}")
    chats = SFTData(Path(cfg.cache), parse_mix(cfg.sft_sources, "sft_sources"), cfg.seq_len, cfg.seed, "train",
                    tokenizer_hash=tok.hash, pack=cfg.sft_pack)
    start = cfg.pretrain_steps - max(1, round(cfg.midtrain_frac * cfg.pretrain_steps))
    return MidtrainData(docs, chats, start, cfg.midtrain_chat_share)
