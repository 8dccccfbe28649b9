"""Validation loss and bits per byte per source, and greedy samples from fixed prompts.

bpb = sum of nats over target tokens that stand for text / (ln 2 * UTF-8 bytes of those tokens);
special tokens (0 bytes) are left out of both sums, so numbers compare across tokenizers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import PocketLMError

IGNORE_INDEX = -100


@dataclass
class EvalResult:
    loss: float  # mean nats per target token (specials included: what training minimises)
    bpb: float
    tokens: int
    nats: float  # sums, so results of several sources can be pooled exactly
    text_nats: float
    text_bytes: int


def pooled(results: Iterable[EvalResult]) -> float:
    """Token-weighted mean loss of several sources."""
    results = list(results)
    return sum(r.nats for r in results) / max(1, sum(r.tokens for r in results))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], byte_lengths: np.ndarray, device: torch.device,
             autocast: contextlib.AbstractContextManager | None = None) -> EvalResult:
    lengths = torch.as_tensor(byte_lengths, dtype=torch.float64, device=device)
    nats = text_nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = text_bytes = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for b in batches:
        x, y = b["x"].to(device), b["y"].to(device)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x, positions=b["positions"].to(device), doc_ids=b["doc_ids"].to(device))
        per_token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="none").double()
        valid = y.flatten() != IGNORE_INDEX
        nbytes = torch.where(valid, lengths[y.flatten().clamp(min=0)], 0.0)
        nats = nats + per_token.sum()
        tokens = tokens + valid.sum()
        text_nats = text_nats + per_token[nbytes > 0].sum()
        text_bytes = text_bytes + nbytes.sum()
    model.train(was_training)
    n, tb = int(tokens), int(text_bytes)  # one sync per source, at the end
    return EvalResult(loss=float(nats) / max(1, n), bpb=float(text_nats) / (math.log(2) * max(1, tb)),
                      tokens=n, nats=float(nats), text_nats=float(text_nats), text_bytes=tb)


def greedy_text(model: nn.Module, tok, prompt_ids: list[int], max_new: int) -> str:
    """The greedy continuation of a prompt (the inference stage's KV-cache generator, temperature 0)."""
    from pocketlm.infer.generate import generate
    from pocketlm.infer.sampling import GenConfig

    steps = generate(model, tok, prompt_ids, GenConfig(max_new_tokens=max_new, temperature=0.0, seed=0))
    return "".join(step.text for step in steps)


def eval_checkpoint(ckpt: str | Path, cache_dir: str | Path, max_batches: int, batch_size: int,
                    device_name: str = "auto") -> dict[str, EvalResult]:
    """`pocketlm eval`: every source of the cache (val split), in fp32, at the row length the checkpoint
    was trained with (the model's block size for a folder that does not record it)."""
    from pocketlm.cache.dataset import PretrainData, SFTData
    from pocketlm.cache.shards import Cache
    from pocketlm.model.io import load_model
    from pocketlm.train.precision import pick_device

    device = pick_device(device_name)
    model, tok, meta = load_model(ckpt, device)
    cache = Cache(cache_dir, tokenizer_hash=tok.hash, verify="size")
    T = meta.get("train_config", {}).get("seq_len", model.cfg.block_size)
    out = {}
    for source in cache.sources("pretrain"):
        if cache.stream(source, "val").n_tokens > T:
            data = PretrainData(cache_dir, {source: 1.0}, T, split="val", verify="size")
            out[source] = evaluate(model, data.val_batches(batch_size, max_batches), tok.token_byte_lengths(), device)
    for source in cache.sources("sft"):
        if cache.stream(source, "val").n_tokens > 0:
            data = SFTData(cache_dir, [source], T, split="val", verify="size")
            out[source] = evaluate(model, data.val_batches(batch_size, max_batches), tok.token_byte_lengths(), device)
    if not out:
        raise PocketLMError(f"{cache_dir}: no source has a validation split to evaluate; rebuild the cache "
                            "with a larger --val-fraction")
    return out
