"""The chat levers and the recipe's single-lever ablations, as one batch for one device session.

Three parts, each skippable (--parts), each appending JSON lines to OUT/chat_levers.jsonl as it goes
(a run cut short keeps what finished) and the whole ending in OUT/chat_levers.md:

  chat       the v1 recipe (configs/v1.toml [train]) trained once (pretrain + SFT), then one lever changed
             at a time and each model judged on the 30 held-out prompts (greedy and sampled at T 0.8,
             top-p 0.95; % ending on <|eot|>, % repeating a 4-word phrase 3+ times; the same measures as
             `pocketlm quickstart`'s transcript, in this process). SFT levers start from the recipe's
             pretrained model; midtraining retrains the pretrain phase. CHAT_LEVERS lists them.
  decoding   the recipe's SFT model under other decodings (DECODINGS), no training.
  ablations  bench/recipe.py's runs: the six single-lever ablations at the 4-pass budget (seed 0, the
             recipe's best 4-pass LR multiplier ×0.5), the full recipe at seeds 0 and 1 beside them, and
             the missing second seeds (1-pass pocketlm ×2, 4-pass baseline 1.5e-3).

    python bench/chat_levers.py --cache runs/v1/cache --out bench/levers_out          # on a GPU
    python bench/chat_levers.py --cache CACHE --out OUT --tiny                          # CPU, minutes

--tiny: the tiny model, a handful of steps, 3 prompts and 8 new tokens, passes /1000: a check that every
path runs, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pocketlm.config import from_dict, load_toml  # noqa: E402
from pocketlm.model.io import INFO_FILE  # noqa: E402
from pocketlm.train.config import TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
V1 = REPO / "configs" / "v1.toml"
# name -> (TrainConfig changes, phases retrained: "sft" starts from the recipe's pretrained model)
CHAT_LEVERS: dict[str, tuple[dict[str, Any], str]] = {
    "recipe": ({}, "pretrain_then_sft"),
    "sft_steps_half": ({"sft_steps_mult": 0.5}, "sft"),  # of the recipe's sft_steps (300 in v1)
    "sft_steps_double": ({"sft_steps_mult": 2.0}, "sft"),
    "sft_lr_1e-4": ({"sft_lr": 1e-4}, "sft"),
    "sft_lr_1e-3": ({"sft_lr": 1e-3}, "sft"),
    "eot_weight_3": ({"sft_eot_weight": 3.0}, "sft"),
    "eot_weight_10": ({"sft_eot_weight": 10.0}, "sft"),
    "one_chat_per_row": ({"sft_pack": False}, "sft"),
    # oasst1 is seen ~45 times at 300 steps: weigh it less, or drop the 39-chat primer.
    "mix_dolly_heavy": ({"sft_sources": ("dolly=0.85", "oasst1=0.1", "primer=0.05")}, "sft"),
    "mix_no_primer": ({"sft_sources": ("dolly=0.67", "oasst1=0.33")}, "sft"),
    "midtrain_10pct": ({"midtrain_frac": 0.1, "midtrain_chat_share": 0.2}, "pretrain_then_sft"),
    "midtrain_20pct_half": ({"midtrain_frac": 0.2, "midtrain_chat_share": 0.5}, "pretrain_then_sft"),
}
# name -> GenConfig fields added to both modes (greedy and sampled) when judging the recipe's SFT model
DECODINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "repeat_1.1": {"repeat_penalty": 1.1, "repeat_last_n": 64},
    "repeat_1.3": {"repeat_penalty": 1.3, "repeat_last_n": 64},
    "frequency_0.5": {"frequency_penalty": 0.5},
    "presence_0.5": {"presence_penalty": 0.5},
}
# bench/recipe.py --runs items (ARM:PASSES:LR:SEED[:ABLATION]); PASSES scaled by --passes-scale
ABLATION_RUNS = [f"pocketlm:4:0.5:{s}" for s in (0, 1)] + [
    f"pocketlm:4:0.5:0:{a}" for a in ("adamw_not_muon", "cosine_not_wsd", "qk_norm", "z_loss_1e-4", "plain_init",
                                      "muon_at_adamw_lr")] + ["pocketlm:1:2:1", "baseline:4:0.0015:1"]
PARTS = ("chat", "decoding", "ablations")
EARLIER_RUNS = REPO / "docs" / "recipe_runs.jsonl"  # the first batch (docs/RESULTS.md section 1)


def base_config(args) -> tuple[TrainConfig, dict[str, Any]]:
    """configs/v1.toml's [train] on --cache; with --tiny, the tiny model and a handful of steps."""
    data = load_toml(V1)
    cfg = from_dict(TrainConfig, data.get("train", {}), where=f"{V1} [train]")
    cfg = dataclasses.replace(cfg, cache=str(args.cache), runs_dir=str(Path(args.out) / "runs"), device=args.device,
                              compile=False)
    if args.tiny:
        from pocketlm.cache.shards import Cache

        cache = Cache(args.cache, None, "size")
        cfg = dataclasses.replace(
            cfg, model="tiny", seq_len=64, micro_batch=4, pretrain_steps=6, sft_steps=4, eval_every=3,
            eval_batches=1, sample_tokens=0, patience=0, warmup_steps=1,
            pretrain_mix=tuple(f"{s}=1" for s in cache.sources("pretrain")),
            sft_sources=tuple(f"{s}=1" for s in cache.sources("sft")))
    return cfg, data.get("model", {}) if not args.tiny else {}


def judge(best: Path, args) -> dict[str, dict[str, float]]:
    """Per decoding: per mode, the share of the held-out replies ending on <|eot|> and looping."""
    from pocketlm.device import pick_device
    from pocketlm.model.io import load_model
    from pocketlm.train.transcript import ask_model, heldout_prompts, summary, write_transcript

    model, tok, _ = load_model(best, pick_device(args.device))
    model.eval()
    prompts = heldout_prompts()[:args.prompts]
    out = {}
    for name in args.decodings:
        t0 = time.perf_counter()
        replies = ask_model(model, tok, prompts, args.max_tokens, decoding=DECODINGS[name])
        out[name] = {**summary(replies), "judge_s": time.perf_counter() - t0}
        write_transcript(replies, Path(args.out) / "transcripts" / f"{best.parent.parent.name}-{name}", args.max_tokens)
    return out


def record(args, row: dict[str, Any]) -> None:
    with (Path(args.out) / "chat_levers.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def started(cfg: TrainConfig) -> bool:
    """Whether the run has a checkpoint to resume from (a rerun of the script goes on where it stopped)."""
    return any((Path(cfg.runs_dir) / cfg.name / phase / "last").exists() for phase in ("pretrain", "sft"))


def run_chat(args, base: TrainConfig, model_over: dict[str, Any]) -> None:
    from pocketlm.train.run import train

    recipe_pre = Path(base.runs_dir) / "recipe" / "pretrain" / "best"
    for name in args.levers:
        over, pipeline = CHAT_LEVERS[name]
        over = dict(over)
        if "sft_steps_mult" in over:  # relative, so --tiny's few steps stay few
            over["sft_steps"] = max(1, round(base.sft_steps * over.pop("sft_steps_mult")))
        cfg = dataclasses.replace(base, name=name, **over)
        t0 = time.perf_counter()
        if pipeline == "sft":
            best = train(cfg, model_over, "sft", resume=started(cfg), init=str(recipe_pre))
        else:
            best = train(cfg, model_over, pipeline, resume=started(cfg))
        train_s = time.perf_counter() - t0
        meta = json.loads((best / INFO_FILE).read_text()).get("meta", {})
        decodings = args.decodings if name == "recipe" and "decoding" in args.parts else ["default"]
        scores = judge(best, argparse.Namespace(**{**vars(args), "decodings": decodings}))
        for decoding, modes in scores.items():
            judge_s = modes.pop("judge_s")
            record(args, {"part": "chat" if decoding == "default" else "decoding", "lever": name,
                          "decoding": decoding, "changes": {k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in over.items()},
                          "sft_val_loss": meta.get("val_loss"), "train_s": round(train_s, 1),
                          "judge_s": round(judge_s, 1), "prompts": args.prompts, "max_tokens": args.max_tokens,
                          **{f"{mode}_{k}": v for mode, s in modes.items() for k, v in s.items()}})


def check_ablation_runs(items: list[str]) -> list[str]:
    """The names in --ablation-runs that bench/recipe.py would refuse (checked before any training)."""
    from bench.recipe import ABLATIONS

    bad = []
    for item in items:
        arm, *rest = item.split(":")
        if arm not in ("baseline", "pocketlm") or len(rest) not in (3, 4) or (
                len(rest) == 4 and rest[3] not in ABLATIONS):
            bad.append(item)
        else:
            try:
                float(rest[0]), float(rest[1]), int(rest[2])
            except ValueError:
                bad.append(item)
    return bad


def run_ablations(args) -> None:
    runs = []
    for item in args.ablation_runs:
        arm, passes, lr, seed, *abl = item.split(":")
        runs.append(":".join([arm, f"{float(passes) * args.passes_scale:g}", lr, seed, *abl]))
    cmd = [sys.executable, str(REPO / "bench" / "recipe.py"), "--cache", str(args.cache), "--out",
           str(Path(args.out) / "recipe"), "--runs", ";".join(runs), "--device", args.device]
    if args.tiny:
        cmd += ["--tiny", "--micro-batch", "4", "--evals", "1", "--final-batches", "1"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def table(args) -> str:
    path = Path(args.out) / "chat_levers.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    lines = ["| lever | decoding | greedy: ends on eot | greedy: loops | sampled: ends on eot | sampled: loops | "
             "SFT val loss | train s | judge s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = "" if r["sft_val_loss"] is None else f"{r['sft_val_loss']:.4f}"
        lines.append(f"| {r['lever']} | {r['decoding']} | {r['greedy_ended_on_eot']:.0%} | "
                     f"{r['greedy_repeats_phrase']:.0%} | {r['sampled_ended_on_eot']:.0%} | "
                     f"{r['sampled_repeats_phrase']:.0%} | {loss} | {r['train_s']} | {r['judge_s']} |")
    recipe_runs = Path(args.out) / "recipe" / "recipe_runs.jsonl"
    if recipe_runs.is_file():
        from bench.recipe import summarize, table as recipe_table

        results = [json.loads(line) for line in recipe_runs.read_text().splitlines() if line]
        if not args.tiny:  # beside the first batch's runs (seed 0 LR searches), which these complete
            key = lambda r: (r["arm"], r["passes"], r["lr"], r["seed"], r["ablation"])  # noqa: E731
            new = {key(r) for r in results}
            results += [r for r in map(json.loads, EARLIER_RUNS.read_text().splitlines()) if key(r) not in new]
        lines += ["", "Recipe ablations and seeds (bench/recipe.py):", "", recipe_table(summarize(results))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="the v1 token cache (e.g. runs/v1/cache of the quickstart)")
    ap.add_argument("--out", default="bench/levers_out")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--levers", default=",".join(CHAT_LEVERS), help="chat levers to run ('recipe' first)")
    ap.add_argument("--decodings", default=",".join(DECODINGS), help="decodings judged on the recipe's model")
    ap.add_argument("--prompts", type=int, default=30, help="held-out prompts asked (of 30)")
    ap.add_argument("--max-tokens", type=int, default=200, help="new tokens per reply (the transcript's)")
    ap.add_argument("--ablation-runs", default=";".join(ABLATION_RUNS),
                    help="bench/recipe.py runs, ';'-separated ARM:PASSES:LR:SEED[:ABLATION]")
    ap.add_argument("--passes-scale", type=float, default=1.0, help="multiplies the ablations' budgets")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="CPU check of every path: tiny model, few steps")
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    args.levers = [n for n in args.levers.split(",") if n]
    args.decodings = [n for n in args.decodings.split(",") if n]
    args.ablation_runs = [r for r in args.ablation_runs.split(";") if r]
    bad = sorted(set(args.parts) - set(PARTS)) + sorted(set(args.levers) - set(CHAT_LEVERS)) + sorted(
        set(args.decodings) - set(DECODINGS)) + check_ablation_runs(args.ablation_runs)
    if bad:
        ap.error(f"unknown part, lever or decoding: {', '.join(bad)}")
    if args.tiny:
        args.prompts, args.max_tokens, args.passes_scale = min(args.prompts, 3), min(args.max_tokens, 8), 1e-3
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if "chat" in args.parts or "decoding" in args.parts:
        base, model_over = base_config(args)
        if "chat" not in args.parts:
            args.levers = ["recipe"]
        # The SFT levers start from the recipe's pretrained model: trained (and judged) first if missing.
        if "recipe" not in args.levers and not (Path(base.runs_dir) / "recipe" / "sft" / "best").exists():
            args.levers.insert(0, "recipe")
        run_chat(args, base, model_over)
    if "ablations" in args.parts:
        run_ablations(args)
    md = table(args)
    (Path(args.out) / "chat_levers.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
