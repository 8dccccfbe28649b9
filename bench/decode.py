"""Decode benchmark, batch 1: prefill and decode tokens/s, and what the inspector's extras cost.

    python bench/decode.py [--ckpt DIR | --preset v1|tiny] [--device auto] [--dtype fp32|bf16]
                           [--prompt-len 128] [--new-tokens 256] [--repeats 3]

Rows (median of --repeats runs, one warm-up run first):
- bare:      the model's forward with a KV cache + argmax + one host transfer: the decode floor.
- generate:  `generate()` as the server runs it: full-vocabulary log-softmax, entropy, top-5 per step.
- +lens:     plus the logit lens (every layer's residual through the final norm and unembedding).
- +attn:     plus attention entropy per head (switches attention to the explicit, non-fused path).
- uncached:  greedy decoding that re-runs the whole sequence every step (no KV cache).
- stats_only: the per-step statistics alone on one row of logits, against argmax alone.
Without --ckpt the weights are random: timings do not depend on the values, and a stand-in
tokenizer whose end-of-turn id is never sampled keeps every run at exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pocketlm.infer.generate import generate  # noqa: E402
from pocketlm.infer.kv_cache import KVCache  # noqa: E402
from pocketlm.infer.sampling import GenConfig, step_stats  # noqa: E402
from pocketlm.model.config import GPTConfig  # noqa: E402
from pocketlm.model.gpt_v1 import GPT  # noqa: E402
from pocketlm.device import pick_device  # noqa: E402


class StandInTokenizer:
    """Just what `generate` needs; eot_id is -1 so a random model never stops early."""

    eot_id = -1

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def id_to_bytes(self, i: int) -> bytes:
        return b"x"

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return "x" * len(ids)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.inference_mode()
def bare(model, prompt: list[int], n: int) -> tuple[float, float]:
    """(prefill ms, decode ms) of the forward + argmax loop alone."""
    p = next(model.parameters())
    cache = KVCache(model.cfg, 1, len(prompt) + n, p.device, p.dtype)
    sync(p.device)
    t0 = time.perf_counter()
    logits, _ = model(torch.tensor([prompt], device=p.device), cache=cache)
    nxt = logits[0, -1].argmax()
    nxt.item()
    t1 = time.perf_counter()
    for _ in range(n - 1):
        logits, _ = model(nxt.view(1, 1), cache=cache)
        nxt = logits[0, -1].argmax()
        nxt.item()  # the host needs each id (to test for end of turn): one sync per token, as in generate
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


@torch.inference_mode()
def uncached(model, prompt: list[int], n: int) -> tuple[float, float]:
    p = next(model.parameters())
    ids = torch.tensor([prompt], device=p.device)
    sync(p.device)
    t0 = time.perf_counter()
    t1 = t0
    for i in range(n):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        ids[0, -1].item()
        if i == 0:
            t1 = time.perf_counter()
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


@torch.inference_mode()
def stats_cost(vocab: int, device: torch.device, dtype: torch.dtype, n: int = 500) -> dict:
    """Per-step ms of choosing a token alone (argmax + transfer) and with the inspector's statistics
    (full-vocabulary log-softmax, entropy, top-5, one transfer), on one row of logits."""
    logits = torch.randn(vocab, device=device, dtype=dtype).float()
    out = {}
    for name, fn in (("argmax_ms", lambda: logits.argmax().item()),
                     ("argmax_stats_ms", lambda: step_stats(logits, logits.argmax(), 5).tolist())):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = round((time.perf_counter() - t0) * 1e3 / n, 4)
    return out


def via_generate(model, tok, prompt: list[int], n: int, **signals: bool) -> tuple[float, float]:
    gen = generate(model, tok, prompt, GenConfig(max_new_tokens=n, temperature=0.0, **signals))
    steps = list(gen)
    assert len(steps) == n, f"stopped after {len(steps)} tokens ({gen.finish_reason})"
    return gen.prefill.ms, gen.decode_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a model folder; default: random weights of --preset")
    ap.add_argument("--preset", default="v1", choices=("v1", "tiny"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-uncached", action="store_true", help="the slowest row; skip it on small CPUs")
    args = ap.parse_args()

    device = pick_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.ckpt:
        from pocketlm.model.io import load_model

        model, tok, _ = load_model(args.ckpt, device)
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig.v1() if args.preset == "v1" else GPTConfig.tiny()).to(device).eval()
        tok = StandInTokenizer(model.cfg.vocab_size)
    model = model.to(dtype)
    prompt = torch.randint(5, tok.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    n = args.new_tokens
    rows = {
        "bare": lambda: bare(model, prompt, n),
        "generate": lambda: via_generate(model, tok, prompt, n),
        "+lens": lambda: via_generate(model, tok, prompt, n, logit_lens=True),
        "+attn": lambda: via_generate(model, tok, prompt, n, attn_entropy=True),
    }
    if not args.skip_uncached:
        rows["uncached"] = lambda: uncached(model, prompt, n)
    print(json.dumps({"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                      else device.type, "dtype": args.dtype, "params": model.num_params(), "prompt": len(prompt),
                      "new_tokens": n, "torch": torch.__version__, "threads": torch.get_num_threads()}))
    print(json.dumps({"row": "stats_only", "vocab": tok.vocab_size, **stats_cost(tok.vocab_size, device, dtype)}))
    base = None
    for name, fn in rows.items():
        fn()  # warm-up: allocator, kernels, caches
        runs = [fn() for _ in range(args.repeats)]
        prefill_ms = statistics.median(r[0] for r in runs)
        decode_ms = statistics.median(r[1] for r in runs)
        per_token = decode_ms / (n - 1)
        base = base or per_token
        print(json.dumps({"row": name, "prefill_ms": round(prefill_ms, 2),
                          "prefill_tok_s": round(len(prompt) / prefill_ms * 1e3, 1),
                          "decode_ms_per_token": round(per_token, 3), "decode_tok_s": round(1e3 / per_token, 1),
                          "vs_bare": f"{(per_token / base - 1) * 100:+.1f}%"}))


if __name__ == "__main__":
    main()
