"""`pocketlm quickstart`: tokenizer -> token cache -> pretrain -> SFT -> eval -> a sample chat, in one go.

Offline by default: it pretrains on the `embedded` source (the docstrings of the installed Python's
standard library) and fine-tunes on the shipped `primer` chats. With --data-dir it uses the real
datasets of the default recipe instead, at a small scale. Each stage is skipped when its output is
already there, so an interrupted quickstart continues where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from pocketlm.config import from_dict, load_toml
from pocketlm.train.config import TrainConfig

CONFIG = Path(__file__).resolve().parent / "quickstart.toml"  # ships inside the package
VOCAB_SIZE = 4096  # the real recipe uses 16000; a small corpus cannot fill more pieces usefully

OFFLINE = {"pretrain": ["embedded"], "sft": ["primer"], "eval": []}
REAL = {"pretrain": ["fineweb_edu:take=2500", "roam"], "sft": ["dolly:take=3000", "oasst1", "primer"],
        "eval": ["wikitext:take=200"]}
CHAT_PROMPTS = ("Hi!", "What can you do?")


def _name(spec: str) -> str:
    return spec.split(":", 1)[0]


def _corpus(sources: dict[str, list[str]], data_dir: str | None) -> Iterator[str]:
    from pocketlm.tokenizer.corpus import source_documents

    for spec in sources["pretrain"] + sources["sft"]:
        for texts in source_documents(spec, data_dir):
            yield "\n".join(texts)  # a chat's messages as one text


def quickstart_config(out: Path, sources: dict[str, list[str]], steps: int | None,
                      device: str) -> tuple[TrainConfig, dict]:
    data = load_toml(CONFIG)
    cfg = from_dict(TrainConfig, data.get("train", {}), where=f"{CONFIG} [train]")
    pretrain = [_name(s) for s in sources["pretrain"]]
    # Several pretrain sources are the recipe's (REAL): they keep its mixture, TrainConfig's default.
    cfg = dataclasses.replace(
        cfg, runs_dir=str(out), cache=str(out / "cache"), device=device,
        pretrain_mix=cfg.pretrain_mix if len(pretrain) > 1 else (f"{pretrain[0]}=1",),
        eval_sources=tuple(_name(s) for s in sources["eval"]), sft_sources=tuple(_name(s) for s in sources["sft"]))
    if steps is not None:
        cfg = dataclasses.replace(cfg, pretrain_steps=steps, sft_steps=steps, warmup_steps=min(cfg.warmup_steps, steps),
                                  eval_every=min(cfg.eval_every, steps))
    return cfg, data.get("model", {})


def quickstart(out: str | Path, data_dir: str | None = None, steps: int | None = None, device: str = "auto") -> int:
    from pocketlm.cache.build_cache import build_cache
    from pocketlm.model.io import load_model
    from pocketlm.tokenizer.chat_template import format_chat_tokens
    from pocketlm.tokenizer.tokenizer_sp import MODEL_FILE, train_tokenizer
    from pocketlm.train.evaluate import eval_checkpoint, greedy_text
    from pocketlm.train.plot import plot_run
    from pocketlm.train.run import train

    out = Path(out)
    sources = REAL if data_dir else OFFLINE
    cfg, model_overrides = quickstart_config(out, sources, steps, device)
    tok_path = out / "tokenizer" / MODEL_FILE
    print(f"[1/6] tokenizer ({VOCAB_SIZE} pieces) -> {tok_path}")
    if not tok_path.is_file():
        train_tokenizer(_corpus(sources, data_dir), vocab_size=VOCAB_SIZE, out_dir=tok_path.parent, seed=cfg.seed)
    print(f"[2/6] token cache -> {cfg.cache}")
    if not (Path(cfg.cache) / "meta.json").is_file():
        specs = ([(s, "pretrain") for s in sources["pretrain"]] + [(s, "eval") for s in sources["eval"]]
                 + [(s, "sft") for s in sources["sft"]])
        build_cache(tok_path, specs, cfg.cache, seed=cfg.seed, data_dir=data_dir, val_fraction=0.1)
    print(f"[3/6] pretrain + [4/6] SFT ({cfg.pretrain_steps} + {cfg.sft_steps} steps) -> {out / cfg.name}")
    best = train(cfg, model_overrides, "pretrain_then_sft", resume=True)
    print("[5/6] evaluation of the SFT model (validation split)")
    for source, r in eval_checkpoint(best, cfg.cache, cfg.eval_batches, cfg.micro_batch, device).items():
        print(f"  {source:>12}  loss {r.loss:.3f}  bpb {r.bpb:.3f}")
    print("[6/6] a sample chat (greedy)")
    model, tok, _ = load_model(best)
    for prompt in CHAT_PROMPTS:
        ids = format_chat_tokens(tok, [{"role": "user", "content": prompt}])
        print(f"  user: {prompt}\n  assistant: {greedy_text(model, tok, ids, 48)}")
    run_dir = out / cfg.name
    plots = plot_run(run_dir)
    print(f"\ncheckpoints: {run_dir / 'pretrain' / 'best'}  {best}")
    print(f"metrics:     {run_dir / 'metrics.jsonl'}")
    print(f"plots:       {'  '.join(str(p) for p in plots)}")
    print(f"chat:        pocketlm chat --ckpt {best}")
    print(f"serve:       pocketlm serve --ckpt {best}")
    return 0
