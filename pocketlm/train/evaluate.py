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
from pocketlm.device import pick_device, to_device
from pocketlm.format import IGNORE_INDEX


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
    # Per-batch sums stay on the device in fp32 / int64 (MPS has no float64: pytorch#122602) and are
    # pooled on the host in float64 after one transfer at the end, so long evaluations lose nothing.
    lengths = torch.as_tensor(byte_lengths, dtype=torch.int64, device=device)
    float_sums, int_sums = [], []  # per batch: [nats, text nats], [tokens, text bytes]
    was_training, flex = model.training, getattr(model, "flex_attention", False)
    model.eval()
    if flex:  # on for a compiled training step; eager, flex attention runs unfused: the dense mask here
        model.flex_attention = False
    for b in batches:
        x, y = to_device(b["x"], device), to_device(b["y"], device)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x, positions=to_device(b["positions"], device),
                              doc_ids=to_device(b["doc_ids"], device))
        per_token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="none")
        valid = y.flatten() != IGNORE_INDEX
        nbytes = torch.where(valid, lengths[y.flatten().clamp(min=0)], 0)
        # where, not per_token[nbytes > 0]: boolean indexing waits for the device to count the rows.
        float_sums.append(torch.stack([per_token.sum(), torch.where(nbytes > 0, per_token, 0).sum()]))
        int_sums.append(torch.stack([valid.sum(), nbytes.sum()]))
    model.train(was_training)
    if flex:
        model.flex_attention = True
    if not float_sums:
        return EvalResult(loss=0.0, bpb=0.0, tokens=0, nats=0.0, text_nats=0.0, text_bytes=0)
    # One sync per source, at the end; the pooling is numpy on the host.
    nats, text_nats = torch.stack(float_sums).cpu().numpy().astype(np.float64).sum(0).tolist()
    n, tb = (int(v) for v in torch.stack(int_sums).cpu().numpy().sum(0))
    return EvalResult(loss=nats / max(1, n), bpb=text_nats / (math.log(2) * max(1, tb)),
                      tokens=n, nats=nats, text_nats=text_nats, text_bytes=tb)


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
