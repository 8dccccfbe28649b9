"""`pocketlm doctor`: what this machine does with pocketlm, measured, as one JSON report to paste into an
issue.

The versions (pocketlm, torch, Python, macOS and chip), the device chosen and what Metal recommends
as its working set; the start-up SDPA self-check at v1's attention shape; a timed run of a few training
steps of the model at the config's micro-batch on random tokens (tokens/s and the peak memory beside
the planner's prediction); a timed greedy decode with and without the inspector's statistics, and the
ops, copies and host reads of one decoded token (on the CPU counted under the MPS-rules mode, so they
are an MPS decode step's).

Everything runs on random weights and random tokens: no data, no tokenizer, no checkpoint. The steps are
the real `train_step` (optimizer, precision and loss scaler of the config), eager (no torch.compile).
"""

from __future__ import annotations

import inspect
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import pocketlm
from pocketlm import PocketLMError
from pocketlm.config import load_toml, resolve
from pocketlm.device import limit_mps_memory, pick_device
from pocketlm.infer.config import StatsRequest
from pocketlm.infer.generate import generate
from pocketlm.infer.op_count import IdTokens, decode_op_counts
from pocketlm.infer.sampling import GenConfig
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.attention import sdpa_self_check
from pocketlm.train.config import TrainConfig
from pocketlm.train.ddp import DistInfo
from pocketlm.train.loop import peak_rss_bytes, status_kib, train_step
from pocketlm.train.muon import build_optimizer
from pocketlm.train.precision import Precision, resolve_precision
from pocketlm.train.run import model_config

DEFAULT_CONFIG = "configs/m4_16gb.toml"
GIB = 1 << 30


def default_config() -> Path | None:
    """configs/m4_16gb.toml from the working directory, else from the source checkout pocketlm runs from."""
    for root in (Path.cwd(), Path(pocketlm.__file__).resolve().parents[1]):
        if (root / DEFAULT_CONFIG).is_file():
            return root / DEFAULT_CONFIG
    return None


def _sysctl(name: str) -> str | None:
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def system_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "pocketlm": pocketlm.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(),
        "macos": platform.mac_ver()[0] or None, "chip": _sysctl("machdep.cpu.brand_string"),
        "device": str(device), "mps_built": torch.backends.mps.is_built(),
        "mps_available": torch.backends.mps.is_available(), "cuda_available": torch.cuda.is_available(),
        "recommended_working_set_bytes": None,
    }
    if device.type == "mps":
        info["recommended_working_set_bytes"] = int(torch.mps.recommended_max_memory())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def sdpa_report(device: torch.device, head_dim: int, n_head: int, dtype: torch.dtype) -> dict[str, Any]:
    cases = sdpa_self_check(device, head_dim, n_head, dtype)
    return {"head_dim": head_dim, "n_head": n_head, "dtype": str(dtype).removeprefix("torch."),
            "ok": all(c["ok"] for c in cases), "cases": len(cases),
            "max_error": max(c["max_error"] for c in cases), "tol": cases[0]["tol"],
            "failed": [c for c in cases if not c["ok"]]}


def planner_prediction(mcfg: GPTConfig, micro_batch: int, seq_len: int, precision: str, device_type: str,
                       checkpointing: bool) -> dict[str, Any]:
    """The planner's bytes for this step, through whatever `plan.estimate` takes today: the arguments it
    names are passed, the others left out; any failure is reported, not raised."""
    try:
        from pocketlm.train import plan

        values = {"cfg": mcfg, "micro_batch": micro_batch, "seq_len": seq_len, "precision": precision,
                  "device": device_type, "checkpointing": checkpointing, "compiled": False}
        params = inspect.signature(plan.estimate).parameters
        est = plan.estimate(**{k: v for k, v in values.items() if k in params})
        out = {"bytes": int(est.total)}
        for name in ("live", "peak", "activations", "static"):
            if isinstance(getattr(est, name, None), (int, float)):
                out[f"{name}_bytes"] = int(getattr(est, name))
        return out
    except Exception as e:  # a report, not a run: say what went wrong and carry on
        return {"error": f"{type(e).__name__}: {e}"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _start_peak_rss() -> int:
    """Restart the peak-RSS count from now where the OS allows it, and return the RSS now. On Linux
    writing 5 to clear_refs resets VmHWM, so an earlier, larger peak (the self-check, imports) cannot
    hide this run's; elsewhere ru_maxrss, which only grows, is the baseline."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        now = status_kib("VmRSS")
        if now is not None:
            return now * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def random_batch(vocab: int, rows: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len + 1), generator=g)
    return {"x": ids[:, :-1].contiguous(), "y": ids[:, 1:].contiguous(),
            "positions": torch.arange(seq_len).repeat(rows, 1), "doc_ids": torch.zeros(rows, seq_len, dtype=torch.long)}


def time_training(model: GPT, cfg: TrainConfig, device: torch.device, precision: str, steps: int,
                  rss_before: int) -> dict[str, Any]:
    """One untimed step (allocations, kernel selection), then `steps` timed ones on random tokens.
    `rss_before`: the process's RSS when its peak count restarted, before the model was built (the
    CPU's baseline)."""
    mcfg = model.cfg
    prec = Precision.create(device, precision)
    opt = build_optimizer(model, cfg, cfg.lr, device)
    batch = [random_batch(mcfg.vocab_size, cfg.micro_batch, cfg.seq_len, 0)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    train_step(model, opt, batch, prec, cfg.grad_clip, device, DistInfo(), cfg.z_loss)
    _sync(device)
    losses = []
    t0 = time.perf_counter()
    for s in range(steps):
        batch = [random_batch(mcfg.vocab_size, cfg.micro_batch, cfg.seq_len, s + 1)]
        loss, _ = train_step(model, opt, batch, prec, cfg.grad_clip, device, DistInfo(), cfg.z_loss)
        losses.append(loss)
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens = steps * cfg.micro_batch * cfg.seq_len
    out: dict[str, Any] = {"steps": steps, "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len,
                           "precision": precision, "checkpointing": cfg.checkpointing, "compiled": False,
                           "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                           "last_loss": float(losses[-1]) if losses else None}
    if device.type == "mps":
        out["peak"] = {"what": "torch.mps.driver_allocated_memory after the steps",
                       "bytes": int(torch.mps.driver_allocated_memory())}
    elif device.type == "cuda":
        out["peak"] = {"what": "torch.cuda.max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    else:
        peak = peak_rss_bytes()
        out["peak"] = {"what": "growth of the process's peak RSS from before the model was built",
                       "bytes": peak - rss_before, "process_peak_rss_bytes": peak}
    out["planned"] = planner_prediction(mcfg, cfg.micro_batch, cfg.seq_len, precision, device.type, cfg.checkpointing)
    if "bytes" in out["planned"] and out["peak"]["bytes"] > 0:
        out["peak_over_planned"] = out["peak"]["bytes"] / out["planned"]["bytes"]
    return out


def time_decode(model: GPT, device: torch.device, prompt_len: int, n_tokens: int) -> dict[str, Any]:
    """Greedy decode of n_tokens after a random prompt: tokens/s without and with the inspector's
    statistics, then the ops of one decoded token."""
    from pocketlm.mps_rules import MPSRules

    model.eval()
    tok = IdTokens(model.cfg.vocab_size)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    out: dict[str, Any] = {"prompt_tokens": prompt_len, "new_tokens": n_tokens}
    for name, stats in (("plain", None), ("inspector", StatsRequest())):
        gen = generate(model, tok, prompt, GenConfig(max_new_tokens=n_tokens, temperature=0.0), stats=stats)
        steps = list(gen)
        out[name] = {"tokens": len(steps), "path": gen.path, "prefill_ms": gen.prefill.ms,
                     "decode_tok_s": gen.decode_tok_s}
    # On the CPU the MPS-rules mode plays the device: the counts are those of an MPS decode step.
    under_rules = device.type == "cpu"
    counts = {}
    short = prompt[:model.cfg.block_size - 9]  # room for the 9 counted tokens
    for name, stats in (("plain", None), ("inspector", StatsRequest())):
        if under_rules:
            with MPSRules():
                c = decode_op_counts(model, tok, short, 8, stats)
        else:
            c = decode_op_counts(model, tok, short, 8, stats)
        counts[name] = {k: c[k] for k in ("ops_per_token", "copies_per_token", "copy_bytes_per_token",
                                           "host_reads_per_token", "kv_len_from", "tokens")}
    out["per_token"] = {"counted": "under the MPS-rules mode (MPS branches)" if under_rules else f"on {device}",
                        **counts}
    return out


def doctor(config: str | None, device_name: str, steps: int, overrides: dict[str, Any],
           model_preset: str | None, decode_tokens: int, prompt_tokens: int) -> dict[str, Any]:
    if steps < 1 or decode_tokens < 2 or prompt_tokens < 1:
        raise PocketLMError("doctor: --steps must be >= 1, --decode-tokens >= 2 and --prompt-tokens >= 1")
    path = Path(config) if config else default_config()
    data = load_toml(path) if path else {}
    train = {**data.get("train", {}), **{k: v for k, v in overrides.items() if v is not None and k != "precision"}}
    if model_preset:
        train["model"] = model_preset
    cfg = resolve(TrainConfig, None, train, where=f"{path or 'TrainConfig defaults'} [train]")
    vocab = data.get("recipe", {}).get("vocab_size", GPTConfig().vocab_size)
    mcfg = model_config(cfg, dict(data.get("model", {})) if not model_preset else {}, vocab)
    device = pick_device(device_name)
    limit_mps_memory(device, lambda m: print(m, file=sys.stderr))
    if decode_tokens + 9 > mcfg.block_size:
        raise PocketLMError(f"doctor: --decode-tokens {decode_tokens} leaves no room for a prompt in the model's "
                            f"block_size {mcfg.block_size}; use at most {mcfg.block_size - 9}")
    # The config's precision is for the config's device (fp16 for MPS in m4_16gb.toml); elsewhere the
    # device's automatic one, unless --precision says otherwise.
    same_device = cfg.device == "auto" or cfg.device.split(":")[0] == device.type
    requested = overrides.get("precision") or (cfg.precision if same_device else "auto")
    precision = resolve_precision(device, requested)
    v1 = GPTConfig.v1()
    report: dict[str, Any] = {"system": system_info(device), "config": str(path) if path else "TrainConfig defaults",
                              "model": {"preset": cfg.model, "n_layer": mcfg.n_layer, "n_head": mcfg.n_head,
                                        "n_embd": mcfg.n_embd, "head_dim": mcfg.head_dim,
                                        "vocab_size": mcfg.vocab_size, "block_size": mcfg.block_size}}
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    shapes = dict.fromkeys(((v1.head_dim, v1.n_head), (mcfg.head_dim, mcfg.n_head)))  # v1's, then the model's
    report["sdpa_self_check"] = [sdpa_report(device, hd, nh, dt) for hd, nh in shapes
                                 for dt in dict.fromkeys((torch.float32, amp_dtype))]
    rss_before = _start_peak_rss()
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(device)
    try:
        report["train"] = time_training(model, cfg, device, precision, steps, rss_before)
    except RuntimeError as e:  # torch.OutOfMemoryError, or MPS's "out of memory" RuntimeError
        if "out of memory" not in str(e).lower():
            raise
        # The answer the report exists for: this micro-batch does not fit here. Say so, then go on.
        report["train"] = {"error": str(e).strip().splitlines()[0], "micro_batch": cfg.micro_batch,
                           "seq_len": cfg.seq_len, "precision": precision,
                           "planned": planner_prediction(mcfg, cfg.micro_batch, cfg.seq_len, precision, device.type,
                                                         cfg.checkpointing)}
        _free(device)
    report["decode"] = time_decode(model, device, min(prompt_tokens, mcfg.block_size - decode_tokens), decode_tokens)
    report["notes"] = ("random weights and tokens; train steps eager (no torch.compile) after one untimed step; "
                       "timings include whatever else the machine was doing")
    return report


def doctor_cli(args) -> int:
    overrides = {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "precision": args.precision}
    report = doctor(args.config, args.device, args.steps, overrides, args.model_preset, args.decode_tokens,
                    args.prompt_tokens)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
