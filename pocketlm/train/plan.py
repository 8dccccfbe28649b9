"""`pocketlm plan`: pick micro_batch / accum_steps / activation checkpointing for a memory budget.

Peak training memory is predicted analytically (bytes), for the attention path each device takes:
  static      16·N: fp32 weights, grads and AdamW's two moments (+2·N for autocast's weight copies)
  activations what autograd keeps for backward, per layer and token (C width, F SwiGLU hidden, H heads,
              a the autocast width, 4 without autocast), measured with saved-tensor hooks
              (bench/mps_memory.py, tests/test_plan.py):
              every path  16·C fp32: the two residual-stream inputs of the RMSNorms and their outputs
              math (MPS)  with grad, MPS has no fused attention: SDPA's math path upcasts q/k/v to fp32
                          (12·C, 20·C without autocast: the qkv and rotated q/k storages) and keeps the
                          fp32 probabilities (4·H·T); the linear and SwiGLU inputs (3·C + 4·F)·a
              cpu         the flash CPU kernel: the qkv and rotated q/k storages, its output, the
                          linear and SwiGLU inputs ((8·C + 4·F)·a), its log-sum-exp (4·H) and the
                          document mask it turns into a float bias per layer (a·T)
              cuda        flash / flex attention: (9·C + 4·F)·a, no T x T term
              plus 8·C a token outside the layers (the embedding output and the final norm's);
              with checkpointing only each block's input (C fp32) plus one block's worth
  loss        eager (MPS, CPU): the chunked loss of model/loss.py keeps at most CHUNK_TOKENS rows of
              logits alive, at 8 bytes a row and vocabulary entry (fp32 logits and their log-softmax;
              the autocast copies are smaller and never alive with both), and saves the hidden
              states' gradient (B·T·C fp32) and the weight's (V·C fp32) for backward;
              compiled (CUDA): B·T·V at 16 bytes (fp32 logits, log-softmax output, two gradient
              buffers) + the autocast copy
  backward    math path: the attention backward of one layer holds two fp32 B·H·T·T temporaries (the
              probabilities' gradient and the scores'); the loss's logits are gone by then, so the
              peak takes the larger of the two moments
  mask        B·T·T bytes (the per-document boolean attention mask)
  overhead    ×1.1 on everything for allocator fragmentation (`total`); `live` is the sum without it,
              what torch.cuda.max_memory_allocated and a fixed-threshold glibc heap measure
On MPS the plan keeps 15% of Metal's recommended working set free (about 2/3 of RAM when planning from
another machine; the working set itself on a Mac).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pocketlm import PocketLMError
from pocketlm.device import auto_precision
from pocketlm.model.accel import accelerated
from pocketlm.model.config import GPTConfig
from pocketlm.model.loss import CHUNK_TOKENS
from pocketlm.train.config import TrainConfig

DEFAULT_BATCH_TOKENS = 65536  # tokens per optimizer step when neither --batch-tokens nor a config says
ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OVERHEAD = 1.10
# Share of the device memory training may use on CUDA (a card keeps some for its context) and CPU.
USABLE = {"cuda": 0.90, "cpu": 0.50}
# MPS: Metal's recommended working set is about 2/3 of RAM on Apple silicon (what the driver lets one
# process use before it swaps, and what device.limit_mps_memory caps a run at); the plan keeps 15% of it
# free for the driver's own buffers and whatever else uses the GPU.
METAL_WORKING_SET = 2 / 3
METAL_FREE = 0.15


@dataclass(frozen=True)
class MemoryEstimate:
    static: int
    activations: int
    logits: int
    mask: int
    loss_saved: int = 0  # the part of `logits` autograd keeps until the backward (gradients of the chunked loss)
    backward: int = 0  # temporaries of one layer's attention backward (math path)

    @property
    def saved(self) -> int:
        """Bytes autograd keeps for backward after the forward (parameters and their casts not counted)."""
        return self.activations + self.loss_saved

    @property
    def live(self) -> int:
        """Bytes of tensors alive at the peak: the end of the forward (the loss's logits) or the first
        attention backward (its T x T temporaries), whichever is larger."""
        return self.static + self.activations + self.mask + max(self.logits, self.loss_saved + self.backward)

    @property
    def total(self) -> int:
        """What the step needs from the device, fragmentation included."""
        return int(OVERHEAD * self.live)


def n_params(cfg: GPTConfig) -> int:
    """Parameters of the v1 architecture (tied embedding counted once)."""
    C, F, L = cfg.n_embd, cfg.ffn_hidden, cfg.n_layer
    per_layer = 3 * C * C + C * C + 3 * C * F + 2 * C
    return cfg.vocab_size * C + L * per_layer + C


def attention_path(device: str, compiled: bool) -> str:
    """How training runs attention on `device`: "math" (MPS: no fused kernel with grad enabled), "cpu" (the
    flash CPU kernel, which takes the document mask) or "flash" (CUDA: flash / memory-efficient / flex)."""
    if device == "mps":
        return "math"
    return "cpu" if device == "cpu" and not compiled else "flash"


def layer_bytes(cfg: GPTConfig, seq_len: int, precision: str, path: str) -> int:
    """Bytes one block keeps for backward per token (see the module docstring)."""
    C, F, H, T = cfg.n_embd, cfg.ffn_hidden, cfg.n_head, seq_len
    a = ACT_BYTES[precision]
    amp = precision != "fp32"
    if path == "math":
        return 16 * C + (12 * C if amp else 20 * C) + (3 * C + 4 * F) * a + 4 * H * T
    if path == "cpu":
        return 16 * C + (8 * C + 4 * F) * a + 4 * H + a * T
    return 16 * C + ((9 * C + 4 * F) if amp else (7 * C + 4 * F)) * a


def estimate(cfg: GPTConfig, micro_batch: int, seq_len: int, precision: str, device: str,
             checkpointing: bool, compiled: bool | None = None) -> MemoryEstimate:
    """`compiled` None: what training takes on `device` (compiled on CUDA unless POCKETLM_ACCEL=0)."""
    if compiled is None:
        compiled = accelerated(torch.device(device))
    C, L, H, V = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size
    a = ACT_BYTES[precision]
    amp = precision != "fp32"
    N = n_params(cfg)
    static = 16 * N + (2 * N if amp else 0)
    path = attention_path(device, compiled)
    per_token_layer = layer_bytes(cfg, seq_len, precision, path)
    tokens = micro_batch * seq_len
    if checkpointing:
        activations = tokens * (L * C * 4 + per_token_layer)
    else:
        activations = tokens * (L * per_token_layer + 8 * C)
    if compiled:
        logits = tokens * V * (16 + (a if amp else 0))
        loss_saved = 0
    else:
        loss_saved = tokens * C * 4 + V * C * 4
        logits = min(tokens, CHUNK_TOKENS) * V * 8 + loss_saved
    backward = 2 * micro_batch * H * seq_len * seq_len * 4 if path == "math" else 0
    return MemoryEstimate(static, activations, logits, micro_batch * seq_len * seq_len, loss_saved, backward)


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    accum_steps: int
    checkpointing: bool
    precision: str
    estimate: MemoryEstimate
    budget: int


def parse_memory(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([GMK]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise PocketLMError(f"--memory {text!r}: write a size like 16GB or 80GB")
    unit = (m.group(2) or "GB").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"G": 1 << 30, "M": 1 << 20, "K": 1 << 10, "": 1}[unit])


def usable(device: str, memory: int, metal_limit: int | None = None) -> int:
    """Bytes a training step may take: on MPS 85% of Metal's recommended working set (this Mac's when
    known, else 2/3 of `memory`), elsewhere a share of `memory`."""
    if device == "mps":
        working_set = metal_limit if metal_limit is not None else int(METAL_WORKING_SET * memory)
        return int((1 - METAL_FREE) * working_set)
    return int(USABLE[device] * memory)


def plan(cfg: GPTConfig, seq_len: int, device: str, memory: int, batch_tokens: int,
         precision: str = "auto", metal_limit: int | None = None) -> Plan:
    """The largest power-of-two micro-batch that fits without checkpointing (at least 4 rows, so
    the GEMMs stay efficient), else the largest that fits with it; accum_steps reach batch_tokens.
    `metal_limit` (MPS: Metal's recommended working set on this machine) replaces the 2/3-of-RAM guess."""
    prec = auto_precision(device) if precision == "auto" else precision
    budget = usable(device, memory, metal_limit)
    sizes = [2 ** k for k in range(8, -1, -1)]
    for ckpt, smallest in ((False, 4), (True, 1)):
        for b in sizes:
            est = estimate(cfg, b, seq_len, prec, device, ckpt)
            if b >= smallest and est.total <= budget:
                return Plan(b, max(1, math.ceil(batch_tokens / (b * seq_len))), ckpt, prec, est, budget)
    raise PocketLMError(f"even micro_batch 1 with checkpointing needs more than the {budget / 2**30:.2f} GiB usable "
                        f"of --memory {memory / 2**30:.1f} GiB at seq_len {seq_len}; lower --seq-len or use a "
                        "smaller model (--model-n-layer, --model-n-embd)")


def describe(p: Plan, seq_len: int) -> str:
    gib = 1 << 30
    e = p.estimate
    return "\n".join([
        f"micro_batch   {p.micro_batch}",
        f"accum_steps   {p.accum_steps}  ({p.micro_batch * p.accum_steps * seq_len:,} tokens per step)",
        f"checkpointing {'on' if p.checkpointing else 'off'}",
        f"precision     {p.precision}",
        f"peak memory   {e.total / gib:.2f} GiB predicted of {p.budget / gib:.2f} GiB usable "
        f"(static {e.static / gib:.2f}, activations {e.activations / gib:.2f}, logits {e.logits / gib:.2f}, "
        f"mask {e.mask / gib:.2f}, attention backward {e.backward / gib:.2f}, x{OVERHEAD} allocator)",
    ])


def plan_toml(p: Plan, base: dict[str, Any], model: dict[str, Any], device: str, memory: str) -> str:
    lines = [f"# Planned by `pocketlm plan --device {device} --memory {memory}`: "
             f"predicted peak {p.estimate.total / 2**30:.2f} GiB of {p.budget / 2**30:.2f} GiB usable.",
             "[train]"]
    values = {**base, "device": device, "precision": p.precision, "micro_batch": p.micro_batch,
              "accum_steps": p.accum_steps, "checkpointing": p.checkpointing}
    lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    if model:
        lines += ["", "[model]"] + [f"{k} = {_toml(v)}" for k, v in model.items()]
    return "\n".join(lines) + "\n"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def metal_limit(device: str) -> int | None:
    """On a Mac with MPS planning for MPS: Metal's recommended working set, with what the driver already
    holds logged; None elsewhere (planning for a Mac from another machine uses --memory alone)."""
    if device != "mps" or not torch.backends.mps.is_available():
        return None
    limit, held = torch.mps.recommended_max_memory(), torch.mps.driver_allocated_memory()
    print(f"Metal: recommended working set {limit / 2**30:.2f} GiB, driver holds {held / 2**30:.2f} GiB")
    return limit


def plan_cli(cfg: TrainConfig, model_overrides: dict[str, Any], device: str, memory: str, batch_tokens: int,
             write: str | None) -> int:
    from pocketlm.train.run import PRESETS

    mcfg = GPTConfig(**{**PRESETS[cfg.model]().to_dict(), **model_overrides})
    if not 0 < cfg.seq_len <= mcfg.block_size:
        raise PocketLMError(f"--seq-len {cfg.seq_len}: use 1 to the model's block_size {mcfg.block_size} "
                            "(or raise --model-block-size)")
    p = plan(mcfg, cfg.seq_len, device, parse_memory(memory), batch_tokens, cfg.precision, metal_limit(device))
    print(describe(p, cfg.seq_len))
    if write:
        Path(write).write_text(plan_toml(p, {"seq_len": cfg.seq_len}, model_overrides, device, memory),
                               encoding="utf-8")
        print(f"wrote {write}")
    return 0
