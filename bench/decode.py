"""Decode benchmark, batch 1: prefill and decode tokens/s, and what the inspector's extras cost,
beside HF `generate` on the same weights in the same run.

    python bench/decode.py [--ckpt DIR | --preset v1|tiny] [--device auto] [--dtype fp32|bf16]
                           [--prompt-len 128] [--new-tokens 256] [--repeats 3] [--rows ...]

Rows (median of --repeats runs, interleaved, one warm-up run first; min and max printed too):
- bare:        the model's forward with a KV cache + argmax + one host transfer: the eager floor.
- gen:         `generate()` on the eager path, no statistics (what chat and the CLI run).
- gen+stats:   eager `generate()` with the inspector's default statistics (entropy, top-5).
- graph:       `generate()` on the accelerated path (CUDA graph per token), no statistics.
- graph+stats: the same with entropy and top-5, computed inside the graph: what the server runs.
- compiled:    the one-token forward compiled (no CUDA graph) with a static cache + argmax (any device).
- +lens:       eager `generate()` with the logit lens (hooks keep it on the eager path).
- +attn:       eager `generate()` with attention entropy per head (explicit attention).
- hf:          HF `generate` (dynamic cache), greedy; hf:static: with `cache_implementation="static"`.
- uncached:    greedy decoding that re-runs the whole sequence every step (no KV cache).
- runc:        llama2.c's `run.c` (CPU only, fp32, OpenMP with --threads): the same shape, prompt-len +
               new-tokens positions from BOS, its own 'achieved tok/s' (bench/llama2c.py).
Without --ckpt the weights are random: timings do not depend on the values, and a stand-in
tokenizer (`IdTokens`) that never ends the text keeps every run at exactly --new-tokens tokens.
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

from bench import results  # noqa: E402
from bench import llama2c  # noqa: E402
from bench.hf_peer import hf_llama  # noqa: E402
from pocketlm.infer import graph_decode  # noqa: E402
from pocketlm.infer.config import StatsRequest  # noqa: E402
from pocketlm.infer.generate import generate  # noqa: E402
from pocketlm.infer.op_count import IdTokens  # noqa: E402
from pocketlm.infer.sampling import GenConfig  # noqa: E402
from pocketlm.infer.stats import token_stats  # noqa: E402
from pocketlm.model.kv_cache import KVCache  # noqa: E402
from pocketlm.model.config import GPTConfig  # noqa: E402
from pocketlm.model.gpt_v1 import GPT  # noqa: E402
from pocketlm.device import pick_device  # noqa: E402


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
                     ("argmax_stats_ms", lambda: token_stats(logits, logits.argmax(), 5).tolist())):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = round((time.perf_counter() - t0) * 1e3 / n, 4)
    return out


@torch.inference_mode()
def compiled(model, prompt: list[int], n: int) -> tuple[float, float]:
    """The one-token forward compiled with a static cache (device-side position), argmax, one transfer."""
    p = next(model.parameters())
    cache = KVCache(model.cfg, 1, model.cfg.block_size, p.device, p.dtype)
    step = graph_decode.compiled_forward()
    sync(p.device)
    t0 = time.perf_counter()
    logits, _ = model(torch.tensor([prompt], device=p.device), cache=cache)
    nxt = logits[0, -1].argmax().view(1, 1)
    nxt.item()
    cache.position.fill_(cache.pos)
    cache.static = True
    t1 = time.perf_counter()
    for _ in range(n - 1):
        nxt = step(model, nxt, cache).argmax().view(1, 1)
        cache.position.add_(1)
        nxt.item()
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def via_generate(model, tok, prompt: list[int], n: int, stats: StatsRequest | None = None,
                 accel: bool = False) -> tuple[float, float]:
    gen = generate(model, tok, prompt, GenConfig(max_new_tokens=n, temperature=0.0), stats=stats, accel=accel)
    steps = list(gen)
    assert len(steps) == n, f"stopped after {len(steps)} tokens ({gen.finish_reason})"
    assert gen.path == ("graph" if accel else "eager"), gen.path
    return gen.prefill.ms, gen.decode_ms


@torch.inference_mode()
def via_hf(hf, prompt: list[int], n: int, static: bool) -> tuple[float, float]:
    """HF generate, greedy, exactly n new tokens: prefill = a 1-token generate, decode = the rest."""
    p = next(hf.parameters())
    ids = torch.tensor([prompt], device=p.device)
    extra = {"cache_implementation": "static"} if static else {}
    def run(k: int) -> float:
        sync(p.device)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, **extra)
        out[0, -1].item()
        assert out.shape[1] == len(prompt) + k
        return (time.perf_counter() - t0) * 1e3
    first = run(1)
    return first, run(n) - first


def via_runc(peer: tuple[Path, Path, Path], prompt_len: int, n: int, threads: int) -> tuple[float, float]:
    """run.c decodes prompt and reply alike, one position per forward: its rate over prompt_len + n
    positions, returned as (no prefill, the decode ms of n tokens at that rate) to fit the other rows."""
    tok_s = llama2c.decode_tok_s(*peer, steps=prompt_len + n, threads=threads)
    return 0.0, (n - 1) / tok_s * 1e3


ROWS = ("bare", "gen", "gen+stats", "graph", "graph+stats", "compiled", "+lens", "+attn", "hf", "hf:static",
        "uncached", "runc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a model folder; default: random weights of --preset")
    ap.add_argument("--preset", default="v1", choices=("v1", "tiny"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--rows", nargs="+", default=[r for r in ROWS if r != "uncached"], choices=ROWS,
                    help="runc runs only on the CPU at the v1 preset, where llama2.c's folder is found")
    ap.add_argument("--runc-dir", default="/tmp/pocketlm-llama2c", help="where run.c is built and its weights written")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results.jsonl")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.ckpt:
        from pocketlm.model.io import load_model

        model, tok, _ = load_model(args.ckpt, device)
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig.v1() if args.preset == "v1" else GPTConfig.tiny()).to(device).eval()
        tok = IdTokens(model.cfg.vocab_size)
    model = model.to(dtype)
    prompt = torch.randint(5, tok.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    n = args.new_tokens
    hf = hf_llama(model).eval() if any(r.startswith("hf") for r in args.rows) else None
    fns = {
        "bare": lambda: bare(model, prompt, n),
        "gen": lambda: via_generate(model, tok, prompt, n),
        "gen+stats": lambda: via_generate(model, tok, prompt, n, StatsRequest()),
        "graph": lambda: via_generate(model, tok, prompt, n, accel=True),
        "graph+stats": lambda: via_generate(model, tok, prompt, n, StatsRequest(), accel=True),
        "compiled": lambda: compiled(model, prompt, n),
        "+lens": lambda: via_generate(model, tok, prompt, n, StatsRequest(logit_lens=True)),
        "+attn": lambda: via_generate(model, tok, prompt, n, StatsRequest(attn_entropy=True)),
        "hf": lambda: via_hf(hf, prompt, n, static=False),
        "hf:static": lambda: via_hf(hf, prompt, n, static=True),
        "uncached": lambda: uncached(model, prompt, n),
    }
    rows = [r for r in args.rows if not (r.startswith("graph") and device.type != "cuda")]
    if "runc" in rows:
        if device.type == "cpu" and args.preset == "v1" and not args.ckpt and llama2c.peer_dir() is not None:
            peer = llama2c.build(Path(args.runc_dir))
            fns["runc"] = lambda: via_runc(peer, len(prompt), n, torch.get_num_threads())
        else:
            rows.remove("runc")
            print("runc skipped: it runs on the CPU at the v1 preset with llama2.c's folder (POCKETLM_LLAMA2C)")
    head = {"device": str(device), "name": results.device_label(device), "dtype": args.dtype,
            "params": model.num_params(), "prompt": len(prompt), "new_tokens": n, "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    print(json.dumps(head))
    print(json.dumps({"row": "stats_only", "vocab": tok.vocab_size, **stats_cost(tok.vocab_size, device, dtype)}))
    warm = {}
    for name in rows:  # warm-up: allocator, kernels, compilation, graph capture
        t0 = time.perf_counter()
        fns[name]()
        warm[name] = round(time.perf_counter() - t0, 1)
    runs: dict[str, list[tuple[float, float]]] = {r: [] for r in rows}
    for _ in range(args.repeats):  # rows interleaved, so a noisy neighbour hits all of them alike
        for name in rows:
            runs[name].append(fns[name]())
    out = []
    for name in rows:
        prefill_ms = statistics.median(r[0] for r in runs[name])
        speeds = sorted((n - 1) / (r[1] / 1e3) for r in runs[name])
        out.append({"row": name, "prefill_ms": round(prefill_ms, 2),
                    "decode_tok_s": round(statistics.median(speeds), 1),
                    "decode_tok_s_min": round(speeds[0], 1), "decode_tok_s_max": round(speeds[-1], 1),
                    "warmup_s": warm[name]})
    speed = {r["row"]: r["decode_tok_s"] for r in out}
    print(f"{'row':<12}{'prefill ms':>11}{'tok/s':>10}{'min':>10}{'max':>10}{'vs hf':>8}{'warm-up s':>10}")
    for r in out:
        vs = f"{r['decode_tok_s'] / speed['hf']:.2f}x" if "hf" in speed else ""
        r["vs_hf"] = vs
        print(f"{r['row']:<12}{r['prefill_ms']:>11.1f}{r['decode_tok_s']:>10,.1f}{r['decode_tok_s_min']:>10,.1f}"
              f"{r['decode_tok_s_max']:>10,.1f}{vs:>8}{r['warmup_s']:>10}")
    if not args.no_record:
        results.append("decode", device, [{**head, **r} for r in out])


if __name__ == "__main__":
    main()
