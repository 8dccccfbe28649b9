"""`pocketlm quickstart`: tokenizer -> token cache -> pretrain -> SFT -> eval -> a sample chat, in one go.

Offline by default: it pretrains on the `embedded` source (the docstrings of the installed Python's
standard library) and fine-tunes on the shipped `primer` chats. With --data-dir it uses the real
datasets of the default recipe instead, at a small scale. With --config (e.g. configs/v1.toml) it runs
the recipe that file describes: its [recipe] table names the sources and the tokenizer size, [train]
and [model] the run, and the chat model is then judged on held-out prompts through `pocketlm serve`
(transcript.md). Sources stream from the hub unless --data-dir names a local mirror. Each stage is
skipped when its output is already there, so an interrupted quickstart continues where it stopped, and
a finished one says so and does nothing (--fresh starts over).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm import PocketLMError
from pocketlm.config import checked, from_dict, load_toml
from pocketlm.train.config import TrainConfig

CONFIG = Path(__file__).resolve().parent / "quickstart.toml"  # ships inside the package
VOCAB_SIZE = 4096  # the real recipe uses 16000; a small corpus cannot fill more pieces usefully

OFFLINE = {"pretrain": ["embedded"], "sft": ["primer"], "eval": []}
REAL = {"pretrain": ["fineweb_edu:take=2500", "roam"], "sft": ["dolly:take=3000", "oasst1", "primer"],
        "eval": ["wikitext:take=200"]}
CHAT_PROMPTS = ("Hi!", "What can you do?")


@dataclass
class RecipeConfig:
    """The [recipe] table of a quickstart TOML: what to read and how large a tokenizer to train."""
    pretrain: tuple[str, ...] = field(default=tuple(REAL["pretrain"]), metadata={"help": "pretrain source specs"})
    eval: tuple[str, ...] = field(default=tuple(REAL["eval"]), metadata={"help": "eval-only source specs"})
    sft: tuple[str, ...] = field(default=tuple(REAL["sft"]), metadata={"help": "SFT source specs"})
    vocab_size: int = field(default=VOCAB_SIZE, metadata={"help": "tokenizer pieces"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of documents held out for validation"})
    transcript_max_tokens: int = field(default=0, metadata={"help": "judge the chat model on the held-out "
                                                                     "prompts through `pocketlm serve`; 0 = skip"})

    def sources(self) -> dict[str, list[str]]:
        return {"pretrain": list(self.pretrain), "sft": list(self.sft), "eval": list(self.eval)}


def _name(spec: str) -> str:
    return spec.split(":", 1)[0]


def _corpus(sources: dict[str, list[str]], data_dir: str | None) -> Iterator[str]:
    from pocketlm.tokenizer.corpus import source_documents

    for spec in sources["pretrain"] + sources["sft"]:
        for texts in source_documents(spec, data_dir):
            yield "\n".join(texts)  # a chat's messages as one text


def quickstart_config(out: Path, sources: dict[str, list[str]], steps: int | None, device: str,
                      path: Path = CONFIG) -> tuple[TrainConfig, dict]:
    data = load_toml(path)
    unknown = sorted(set(data) - {"recipe", "train", "model"})
    if unknown:
        raise PocketLMError(f"{path}: unknown table(s) {', '.join(unknown)}; use [recipe], [train] and [model]")
    for name in ("recipe", "train", "model"):
        if not isinstance(data.get(name, {}), dict):
            raise PocketLMError(f"{path}: [{name}] must be a table of keys, got {data[name]!r}")
    table = data.get("train", {})
    cfg = from_dict(TrainConfig, table, where=f"{path} [train]")
    pretrain = [_name(s) for s in sources["pretrain"]]
    # Several pretrain sources are the recipe's: they keep its mixture (TrainConfig's default), unless the
    # file sets the mixture itself.
    auto = {"pretrain_mix": cfg.pretrain_mix if len(pretrain) > 1 else (f"{pretrain[0]}=1",),
            "eval_sources": tuple(_name(s) for s in sources["eval"]),
            "sft_sources": tuple(_name(s) for s in sources["sft"])}
    cfg = dataclasses.replace(cfg, runs_dir=str(out), cache=str(out / "cache"), device=device,
                              **{k: v for k, v in auto.items() if k not in table})
    if steps is not None:
        warmup = None if cfg.warmup_steps is None else min(cfg.warmup_steps, steps)
        cfg = dataclasses.replace(cfg, pretrain_steps=steps, sft_steps=steps, tokens=0.0, epochs=0.0,
                                  warmup_steps=warmup, eval_every=min(cfg.eval_every, steps))
    from pocketlm.model.config import GPTConfig

    return cfg, checked(GPTConfig, data.get("model", {}), where=f"{path} [model]")


def recipe_config(path: str | Path | None, data_dir: str | None) -> tuple[RecipeConfig, Path]:
    """The [recipe] of --config, or the built-in small recipe (offline, or the real data with --data-dir)."""
    if path is None:
        small = RecipeConfig(**{k: tuple(v) for k, v in (REAL if data_dir else OFFLINE).items()}, val_fraction=0.1)
        return small, CONFIG
    return from_dict(RecipeConfig, load_toml(path, "recipe"), where=f"{path} [recipe]"), Path(path)


def command_name() -> str:
    """How to call pocketlm from here: `pocketlm` when it is on PATH, else the script beside this Python
    (e.g. `.venv/bin/pocketlm` after the README's install), else `python -m pocketlm`."""
    if shutil.which("pocketlm"):
        return "pocketlm"
    script = Path(sys.executable).parent / "pocketlm"
    if script.is_file():
        try:
            return str(script.relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return f"{sys.executable} -m pocketlm"


def print_ending(run_dir: Path, best: Path, plots: list[Path]) -> None:
    pocketlm = command_name()
    print(f"\ncheckpoints: {run_dir / 'pretrain' / 'best'}  {best}")
    print(f"metrics:     {run_dir / 'metrics.jsonl'}")
    if plots:
        print(f"plots:       {'  '.join(str(p) for p in plots)}")
    print(f"chat:        {pocketlm} chat --ckpt {best}")
    print(f"serve:       {pocketlm} serve --ckpt {best}")


def quickstart(out: str | Path, data_dir: str | None = None, steps: int | None = None, device: str = "auto",
               config: str | Path | None = None, fresh: bool = False) -> int:
    from pocketlm.cache.build_cache import build_cache
    from pocketlm.device import pick_device
    from pocketlm.model.io import load_model
    from pocketlm.tokenizer.chat_template import format_chat_tokens
    from pocketlm.tokenizer.tokenizer_sp import MODEL_FILE, train_tokenizer
    from pocketlm.train.evaluate import eval_checkpoint, greedy_text
    from pocketlm.train.plot import plot_run
    from pocketlm.train.run import check_config, finished_run, train

    out = Path(out)
    pick_device(device)  # an unusable --device is refused before minutes of tokenizer and cache
    recipe, path = recipe_config(config, data_dir)
    sources = recipe.sources()
    cfg, model_overrides = quickstart_config(out, sources, steps, device, path)
    check_config(cfg)
    tok_path = out / "tokenizer" / MODEL_FILE
    run_dir = out / cfg.name
    if fresh:  # only what quickstart writes: OUT itself and anything else in it stay
        for folder in (tok_path.parent, Path(cfg.cache), run_dir):
            if folder.is_dir():
                print(f"--fresh: removing {folder}")
                shutil.rmtree(folder)
    done = finished_run(cfg) if (Path(cfg.cache) / "meta.json").is_file() else None
    if done is not None:
        print(f"quickstart already finished in {out}: nothing to do (--fresh starts over)")
        for line in done:
            print(f"  {line}")
        print_ending(run_dir, run_dir / "sft" / "best", sorted(run_dir.glob("*.png")))
        return 0
    print(f"[1/6] tokenizer ({recipe.vocab_size} pieces) -> {tok_path}")
    if not tok_path.is_file():
        train_tokenizer(_corpus(sources, data_dir), vocab_size=recipe.vocab_size, out_dir=tok_path.parent,
                        seed=cfg.seed)
    print(f"[2/6] token cache -> {cfg.cache}")
    if not (Path(cfg.cache) / "meta.json").is_file():
        specs = ([(s, "pretrain") for s in sources["pretrain"]] + [(s, "eval") for s in sources["eval"]]
                 + [(s, "sft") for s in sources["sft"]])
        build_cache(tok_path, specs, cfg.cache, seed=cfg.seed, data_dir=data_dir, val_fraction=recipe.val_fraction)
    length = f"{cfg.pretrain_steps} steps" if cfg.pretrain_steps else f"{cfg.tokens or cfg.epochs:g} tokens/passes"
    print(f"[3/6] pretrain ({length}) + [4/6] SFT ({cfg.sft_steps} steps) -> {out / cfg.name}")
    resume = any((run_dir / phase / "last").exists() for phase in ("pretrain", "sft"))
    best = train(cfg, model_overrides, "pretrain_then_sft", resume=resume)
    print(f"[5/6] evaluation of the SFT model (validation split; `pocketlm eval --batches {cfg.eval_batches} "
          f"--batch-size {cfg.micro_batch}` reads the same)")
    for source, r in eval_checkpoint(best, cfg.cache, cfg.eval_batches, cfg.micro_batch, device).items():
        print(f"  {source:>12}  loss {r.loss:.3f}  bpb {r.bpb:.3f}  ({r.tokens:,} tokens)")
    print("[6/6] a sample chat (greedy)")
    model, tok, _ = load_model(best)
    for prompt in CHAT_PROMPTS:
        ids = format_chat_tokens(tok, [{"role": "user", "content": prompt}])
        print(f"  user: {prompt}\n  assistant: {greedy_text(model, tok, ids, 48)}")
    if recipe.transcript_max_tokens:
        from pocketlm.train.transcript import ask_all, heldout_prompts, write_transcript

        print(f"[6/6] held-out prompts through `pocketlm serve` -> {run_dir / 'transcript.md'}")
        replies = ask_all(best, heldout_prompts(), recipe.transcript_max_tokens, device)
        for mode, s in write_transcript(replies, run_dir, recipe.transcript_max_tokens).items():
            print(f"  {mode}: {s['ended_on_eot']:.0%} end on <|eot|>, {s['repeats_phrase']:.0%} repeat a phrase")
    print_ending(run_dir, best, plot_run(run_dir))
    return 0
