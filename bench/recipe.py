"""pocketlm's pretraining recipe against a standard baseline, at equal tokens on the same data.

Both arms read the same token cache (same tokenizer, same windows in the same order for a seed, the
same per-document attention masks and RoPE positions), train the same shape (v1 unless told) with the
same batch and warmup share, and are judged by the same evaluator (pocketlm.train.evaluate) on the
held-out FineWeb and WikiText splits, in bits per byte.

  baseline  transformers LlamaForCausalLM, its own init, plain AdamW (betas 0.9/0.95, weight decay 0.1 on
            every parameter), linear warmup + cosine to 10%; the best of 3 peak LRs.
  pocketlm  pocketlm's GPT trained with TrainConfig's recipe (Muon + AdamW, WSD, ...); the best of 3 peak
            LRs (the config's LR pair times 0.5, 1, 2).
Budgets are passes over the pretraining mixture's train split (default 1 and 4). The LR search runs at
seed 0; the best LR of each arm is then repeated at the other seeds, and the table gives mean and spread.
Ablations switch one lever of the pocketlm recipe at a time, at the best pocketlm LR, seed 0: at the
smallest budget, except the levers meant for repeated data (weight decay, mixing in Gutenberg) which run
at the largest; each compares with the recipe's own runs at that budget (two seeds).

    python bench/recipe.py --cache CACHE --out OUT --deadline 360        # on a GPU
    python bench/recipe.py --cache CACHE --out OUT --tiny --budgets 0.01   # a smoke test on CPU
    python bench/recipe.py --plot OUT/recipe_runs.jsonl                    # table + curves from a finished run

Each finished run is one line of OUT/recipe_runs.jsonl; the summary is appended (device, torch version,
date, git commit) to OUT/results.jsonl. Runs that would not finish before --deadline are skipped and listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results as bench_results  # noqa: E402
from pocketlm.cache.dataset import PretrainData
from pocketlm.device import pick_device
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.gpt_v1 import _attention_mask
from pocketlm.model.hf_bridge import hf_config
from pocketlm.train.budget import train_tokens
from pocketlm.train.config import TrainConfig, warmup_for
from pocketlm.train.ddp import DistInfo
from pocketlm.train.evaluate import evaluate
from pocketlm.train.loop import train_step
from pocketlm.train.muon import build_optimizer, set_lr
from pocketlm.train.precision import Precision, device_name, resolve_precision
from pocketlm.train.pretrain import parse_mix
from pocketlm.train.run import cache_tokenizer
from pocketlm.train.schedule import lr_at

BASELINE_LRS = (1.5e-3, 3e-3, 6e-3)
POCKET_MULTS = (0.5, 1.0, 2.0)
BASELINE_WD = 0.1
# One lever of the pocketlm recipe switched at a time: name -> (TrainConfig changes, GPTConfig changes).
ABLATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "recipe": ({}, {}),  # the recipe itself (the comparison's pocketlm runs)
    "adamw_not_muon": ({"optimizer": "adamw"}, {}),
    "cosine_not_wsd": ({"schedule": "cosine"}, {}),
    "qk_norm": ({}, {"qk_norm": True}),
    "z_loss_1e-4": ({"z_loss": 1e-4}, {}),
    "plain_init": ({}, {}),  # normal(0, init_std) everywhere: no 1/sqrt(2L) on residual projections (run_one)
    "muon_at_adamw_lr": ({"muon_lr": TrainConfig.lr}, {}),  # one LR for both parts, not the (lr, muon_lr) pair
    "no_weight_decay": ({"weight_decay": 0.0}, {}),
    "gutenberg_20pct": ({"pretrain_mix": ("fineweb_edu=0.76", "roam=0.04", "gutenberg=0.2")}, {}),
}
REPEATED_DATA_LEVERS = ("no_weight_decay", "gutenberg_20pct")  # ablated at the largest budget


class LlamaAsPocket(nn.Module):
    """A LlamaForCausalLM behind pocketlm's forward signature, given the same per-document mask."""

    def __init__(self, cfg: GPTConfig, eot_id: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = hf_config(cfg, eot_id, "float32")
        hf.pop("architectures"), hf.pop("model_type"), hf.pop("torch_dtype")
        self.hf = LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="sdpa"))
        self.cfg = cfg

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, positions: torch.Tensor,
                doc_ids: torch.Tensor, return_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        # return_logits: train_step's flag for GPT, which can skip forming the logits; these are always formed.
        _, mask = _attention_mask(idx.shape[1], 0, doc_ids, False, idx.device)
        logits = self.hf(input_ids=idx, position_ids=positions, attention_mask=mask).logits.float()
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    arm: str  # baseline | pocketlm
    passes: float
    seed: int
    lr: float  # baseline: AdamW peak; pocketlm: multiplier of the config's (lr, muon_lr)
    ablation: str = "recipe"

    @property
    def name(self) -> str:
        extra = "" if self.ablation == "recipe" else f" {self.ablation}"
        return f"{self.arm} {self.passes:g}p lr{self.lr:g} s{self.seed}{extra}"


def recipe_config(base: TrainConfig, spec: RunSpec) -> tuple[TrainConfig, dict[str, Any]]:
    train_over, model_over = ABLATIONS[spec.ablation]
    cfg = dataclasses.replace(base, seed=spec.seed, **train_over)
    if spec.arm == "pocketlm":
        cfg = dataclasses.replace(cfg, lr=cfg.lr * spec.lr, muon_lr=cfg.muon_lr * spec.lr)
    return cfg, model_over


def plain_init(model: GPT) -> None:
    """The residual projections re-drawn at the same std as every other matrix (the GPT-2 init's
    1/sqrt(2L) scaling undone), for the init ablation."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=model.cfg.init_std)


def run_one(spec: RunSpec, base: TrainConfig, mcfg: GPTConfig, val: dict[str, PretrainData], device: torch.device,
            tok, evals: int, eval_rows: int, final_batches: int | None = None,
            save_dir: str | None = None) -> dict[str, Any]:
    cfg, model_over = recipe_config(base, spec)
    mix = parse_mix(cfg.pretrain_mix)
    data = PretrainData(cfg.cache, mix, cfg.seq_len, spec.seed, "train", tokenizer_hash=tok.hash)
    per_step = cfg.micro_batch * cfg.seq_len
    mix_tokens = sum(train_tokens(cfg.cache, list(parse_mix(base.pretrain_mix))).values())  # the same for all
    steps = max(1, math.ceil(spec.passes * mix_tokens / per_step))
    warmup = warmup_for(cfg, steps)
    torch.manual_seed(spec.seed)
    if spec.arm == "baseline":
        model = LlamaAsPocket(mcfg, tok.special_token_ids()["<|eot|>"]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=BASELINE_WD, fused=device.type == "cuda")
        peak, schedule = spec.lr, "cosine"
    else:
        model = GPT(dataclasses.replace(mcfg, **model_over)).to(device)
        if spec.ablation == "plain_init":
            plain_init(model)
        opt = build_optimizer(model, cfg, cfg.lr, device)
        peak, schedule = cfg.lr, cfg.schedule
    model.train()
    prec = Precision.create(device, resolve_precision(device, cfg.precision))
    lengths = tok.token_byte_lengths()
    every = max(1, steps // evals)
    curve, t0, losses = [], time.perf_counter(), []

    def measure(max_batches: int | None) -> dict[str, float]:
        return {s: evaluate(model, d.val_batches(eval_rows, max_batches), lengths, device, prec.autocast()).bpb
                for s, d in val.items()}

    train_s = 0.0
    for step in range(steps):
        set_lr(opt, lr_at(step, peak, steps, warmup, cfg.min_lr_frac, schedule, cfg.decay_frac))
        tick = time.perf_counter()
        loss, _ = train_step(model, opt, [data.batch(step, cfg.micro_batch)], prec, cfg.grad_clip, device,
                             DistInfo(), cfg.z_loss)
        if (step + 1) % every == 0 or step + 1 == steps:
            losses.append(float(loss))  # the host sync of this step
            train_s += time.perf_counter() - tick
            if step + 1 < steps:
                curve.append({"step": step + 1, "tokens": (step + 1) * per_step, **measure(4)})
        else:
            train_s += time.perf_counter() - tick
    final = measure(final_batches)
    curve.append({"step": steps, "tokens": steps * per_step, **final})
    out = {**dataclasses.asdict(spec), "name": spec.name, "steps": steps, "tokens": steps * per_step,
           "warmup": warmup, "schedule": schedule, "final": final, "curve": curve, "train_loss": losses,
           "tok_per_s": steps * per_step / max(train_s, 1e-9), "wall_s": time.perf_counter() - t0,
           "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                      if k in ("optimizer", "lr", "muon_lr", "weight_decay", "z_loss", "schedule", "pretrain_mix")},
           "model_overrides": model_over}
    if save_dir and spec.arm == "pocketlm":  # a pretrained model for SFT (`pocketlm train --phase sft --init`)
        from pocketlm.model.io import save_model

        save_model(save_dir, model, tok.path, {"phase": "pretrain", "step": steps, "bench_run": spec.name,
                                                "special_ids": tok.special_token_ids(),
                                                "train_config": {"seq_len": cfg.seq_len}})
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def judge(r: dict[str, Any]) -> float:
    return r["final"]["fineweb_edu"]


class Scheduler:
    """Runs specs in order while the deadline allows (estimated from the throughput seen so far)."""

    def __init__(self, args, base, mcfg, val, device, tok, out: Path) -> None:
        self.args, self.base, self.mcfg, self.val, self.device, self.tok = args, base, mcfg, val, device, tok
        self.out, self.t0, self.results, self.skipped = out, time.perf_counter(), [], []
        self.rate: dict[str, float] = {}  # arm -> wall seconds per training token

    def run(self, spec: RunSpec) -> dict[str, Any] | None:
        mix_tokens = sum(train_tokens(self.base.cache, list(parse_mix(self.base.pretrain_mix))).values())
        guess = self.rate.get(spec.arm, 0.0) * spec.passes * mix_tokens
        if self.args.deadline and time.perf_counter() - self.t0 + guess > self.args.deadline:
            self.skipped.append(spec.name)
            print(f"skip (deadline): {spec.name}", flush=True)
            return None
        save = self.args.save_model if spec.name == self.args.save_run else None
        r = run_one(spec, self.base, self.mcfg, self.val, self.device, self.tok, self.args.evals,
                    self.args.eval_rows, self.args.final_batches, save)
        self.rate[spec.arm] = r["wall_s"] / r["tokens"]
        self.results.append(r)
        with (self.out / "recipe_runs.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
        fin = " ".join(f"{s} {b:.4f}" for s, b in r["final"].items())
        print(f"{spec.name}: {r['tokens']:,} tokens, {r['tok_per_s']:,.0f} tok/s, {r['wall_s']:.0f} s | bpb {fin}",
              flush=True)
        return r

    def best_lr(self, arm: str, passes: float) -> float:
        runs = [r for r in self.results if r["arm"] == arm and r["passes"] == passes and r["seed"] == 0
                and r["ablation"] == "recipe"]
        return min(runs, key=judge)["lr"] if runs else (3e-3 if arm == "baseline" else 1.0)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (arm, budget): the best seed-0 LR, then mean/spread over seeds at that LR; plus ablations."""
    rows = []
    keys = sorted({(r["arm"], r["passes"], r["ablation"]) for r in results})
    for arm, passes, abl in keys:
        runs = [r for r in results if (r["arm"], r["passes"], r["ablation"]) == (arm, passes, abl)]
        seed0 = [r for r in runs if r["seed"] == 0]
        if not seed0:
            continue
        lr = min(seed0, key=judge)["lr"]
        at = [r for r in runs if r["lr"] == lr]
        row = {"arm": arm, "passes": passes, "ablation": abl, "lr": lr, "tokens": at[0]["tokens"],
               "seeds": [r["seed"] for r in at], "lr_search": {f"{r['lr']:g}": round(judge(r), 4) for r in seed0}}
        for source in at[0]["final"]:
            vals = [r["final"][source] for r in at]
            row[source] = round(statistics.fmean(vals), 4)
            row[source + "_spread"] = round(max(vals) - min(vals), 4)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| arm | passes | ablation | best LR | tokens | seeds | FineWeb bpb (spread) | WikiText bpb (spread) |"
             " LR search (FineWeb bpb, seed 0) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['passes']:g} | {r['ablation']} | {r['lr']:g} | {r['tokens']:,} | "
                     f"{','.join(map(str, r['seeds']))} | {r.get('fineweb_edu', float('nan')):.4f} "
                     f"({r.get('fineweb_edu_spread', 0):.4f}) | {r.get('wikitext', float('nan')):.4f} "
                     f"({r.get('wikitext_spread', 0):.4f}) | {r['lr_search']} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, source in zip(axes, ("fineweb_edu", "wikitext")):
        for row in (r for r in rows if r["ablation"] == "recipe"):
            for r in results:
                if (r["arm"], r["passes"], r["ablation"], r["lr"]) == (row["arm"], row["passes"], "recipe",
                                                                       row["lr"]):
                    xs = [p["tokens"] / 1e6 for p in r["curve"]]
                    ys = [p[source] for p in r["curve"]]
                    style = "-" if r["arm"] == "pocketlm" else "--"
                    ax.plot(xs, ys, style, label=f"{r['arm']} {r['passes']:g}p lr{r['lr']:g} s{r['seed']}")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel(f"{source} validation bpb")
        ax.set_title(f"{source}: pocketlm (solid) vs Llama + AdamW (dashed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", help="token cache with fineweb_edu, roam (and gutenberg) + wikitext")
    ap.add_argument("--out", default="bench/recipe_out", help="folder for recipe_runs.jsonl and results.jsonl")
    ap.add_argument("--budgets", default="1,4", help="passes over the pretraining mixture, comma-separated")
    ap.add_argument("--seeds", default="0,1", help="seeds; the LR search uses the first")
    ap.add_argument("--ablations", default=",".join(a for a in ABLATIONS if a != "recipe"),
                    help="which ablations, comma-separated; '' = none")
    ap.add_argument("--pocket-mult", type=float, help="skip the search: the pocketlm LR multiplier for ablations")
    ap.add_argument("--only", choices=("compare", "ablations"), help="run one part")
    ap.add_argument("--runs", help="run just these, ';'-separated ARM:PASSES:LR:SEED[:ABLATION] (e.g. "
                                   "pocketlm:4:0.5:1;baseline:4:0.0015:1)")
    ap.add_argument("--save-model", help="folder to save the model of the run named by --save-run")
    ap.add_argument("--save-run", help="run name, e.g. 'pocketlm 4p lr0.5 s1'")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; runs that would end later are skipped")
    ap.add_argument("--micro-batch", type=int, default=32, help="rows of seq_len tokens per step (both arms)")
    ap.add_argument("--evals", type=int, default=8, help="curve points per run")
    ap.add_argument("--eval-rows", type=int, default=16, help="rows per evaluation batch")
    ap.add_argument("--final-batches", type=int, help="cap on the final evaluation's batches (default: all)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model on 128-token rows (CPU smoke)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--plot", help="recipe_runs.jsonl of a finished run: print the table and draw the curves")
    args = ap.parse_args()

    if args.plot:
        results = [json.loads(line) for line in Path(args.plot).read_text().splitlines() if line.strip()]
        print(table(summarize(results)))
        print(plot(results, Path(args.plot).with_name("recipe_curves.png")))
        return 0
    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = cache_tokenizer(Path(args.cache))
    T = 128 if args.tiny else 1024
    base = TrainConfig(cache=args.cache, seq_len=T, micro_batch=args.micro_batch, accum_steps=1, device=args.device)
    mcfg = GPTConfig.v1(vocab_size=tok.vocab_size) if not args.tiny else GPTConfig.tiny(
        vocab_size=tok.vocab_size, block_size=T, n_embd=64, n_head=4)
    val = {s: PretrainData(args.cache, {s: 1.0}, T, 0, "val", verify="size") for s in ("fineweb_edu", "wikitext")}
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"device {device_name(device)}, torch {torch.__version__}, {T}-token rows x {args.micro_batch}, "
          f"model {mcfg.n_layer}x{mcfg.n_embd}, recipe: optimizer {base.optimizer} lr {base.lr} muon_lr "
          f"{base.muon_lr} schedule {base.schedule} warmup_frac {base.warmup_frac} wd {base.weight_decay}",
          flush=True)
    sched = Scheduler(args, base, mcfg, val, device, tok, out)
    if args.runs:
        for item in args.runs.split(";"):
            arm, passes, lr, seed, *abl = item.split(":")
            sched.run(RunSpec(arm, float(passes), int(seed), float(lr), abl[0] if abl else "recipe"))
    elif args.only != "ablations":
        for passes in sorted(budgets, reverse=True):  # the larger budget decides more; run it first
            for lr in BASELINE_LRS:
                sched.run(RunSpec("baseline", passes, seeds[0], lr))
            for mult in POCKET_MULTS:
                sched.run(RunSpec("pocketlm", passes, seeds[0], mult))
        for passes in sorted(budgets, reverse=True):
            for seed in seeds[1:]:
                for arm in ("baseline", "pocketlm"):
                    sched.run(RunSpec(arm, passes, seed, sched.best_lr(arm, passes)))
    if args.only != "compare" and not args.runs:
        for name in filter(None, args.ablations.split(",")):
            passes = max(budgets) if name in REPEATED_DATA_LEVERS else min(budgets)
            mult = args.pocket_mult or sched.best_lr("pocketlm", passes)
            sched.run(RunSpec("pocketlm", passes, seeds[0], mult, name))
    rows = summarize(sched.results)
    print(table(rows))
    if sched.skipped:
        print("skipped for the deadline: " + "; ".join(sched.skipped))
    bench_results.append("recipe", device, [{"rows": rows, "skipped": sched.skipped}], path=out / "results.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
