"""CLI of the train stage: `pocketlm train`, `eval`, `plan`, `plot`, `quickstart` and `doctor`."""

from __future__ import annotations

import argparse
from typing import Any

from pocketlm import PocketLMError
from pocketlm.config import add_dataclass_args, checked, load_toml, resolve
from pocketlm.model.config import GPTConfig
from pocketlm.train.config import TrainConfig

TOML_TABLES = ("train", "model", "recipe")  # [recipe] is read by `pocketlm quickstart --config`


def read_config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """TrainConfig and the model-shape overrides: dataclass defaults <- --config TOML <- flags."""
    data = load_toml(args.config) if args.config else {}
    unknown = sorted(set(data) - set(TOML_TABLES))
    if unknown:
        raise PocketLMError(f"{args.config}: unknown table(s) {', '.join(unknown)}; use [train], [model] (and [recipe])")
    where = args.config or "flags"
    for table in TOML_TABLES:
        if not isinstance(data.get(table, {}), dict):
            raise PocketLMError(f"{where}: [{table}] must be a table of keys, got {data[table]!r}")
    cfg = resolve(TrainConfig, args, data.get("train", {}), where=f"{where} [train]")
    model = checked(GPTConfig, dict(data.get("model", {})), where=f"{where} [model]")
    names = {f for f in GPTConfig.__dataclass_fields__}
    for name in names:
        value = getattr(args, f"model_{name}", None)
        if value is not None:
            model[name] = value
    return cfg, model


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train(args: argparse.Namespace) -> int:
    from pocketlm.train.run import train

    if args.phase and args.pipeline:
        raise PocketLMError("give --phase or --pipeline, not both")
    cfg, model = read_config(args)
    best = train(cfg, model, args.phase or args.pipeline or "pretrain_then_sft", args.resume, args.init)
    print(f"best checkpoint: {best}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pocketlm.train.evaluate import eval_checkpoint

    for source, r in eval_checkpoint(args.ckpt, args.cache, args.batches, args.batch_size, args.device).items():
        print(f"{source:>12}  loss {r.loss:.4f}  bpb {r.bpb:.4f}  ({r.tokens:,} tokens)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pocketlm.train.plan import DEFAULT_BATCH_TOKENS, plan_cli

    cfg, model = read_config(args)
    train = load_toml(args.config).get("train", {}) if args.config else {}
    # The device: --device, else the config's, else an Apple GPU (the machine this project targets), said
    # out loud: on a Linux box the plan is otherwise easy to mistake for one of this machine.
    device = args.device or (cfg.device if cfg.device in ("mps", "cuda", "cpu") else None)
    if device is None:
        device = "mps"
        print("planning for mps (an Apple GPU, the default); pass --device cuda or --device cpu to plan for "
              "another device")
    # Tokens per step: --batch-tokens, else the config's own micro_batch x accum_steps x seq_len.
    batch_tokens = args.batch_tokens
    if batch_tokens is None:
        given = "micro_batch" in train or "accum_steps" in train
        batch_tokens = cfg.micro_batch * cfg.accum_steps * cfg.seq_len if given else DEFAULT_BATCH_TOKENS
    return plan_cli(cfg, model, device, args.memory, batch_tokens, args.write)


def _plot(args: argparse.Namespace) -> int:
    from pocketlm.train.plot import plot_run

    for path in plot_run(args.run):
        print(path)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from pocketlm.train.quickstart import quickstart

    return quickstart(args.out, args.data_dir, args.steps, args.device, args.config, args.fresh)


def _doctor(args: argparse.Namespace) -> int:
    from pocketlm.train.doctor import doctor_cli

    return doctor_cli(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain and/or fine-tune a model from a token cache")
    p.add_argument("--config", help="TOML file with [train] and [model] tables (e.g. configs/m4_16gb.toml)")
    p.add_argument("--phase", choices=("pretrain", "sft"), help="run one phase")
    p.add_argument("--pipeline", choices=("pretrain_then_sft",), help="run both phases (the default)")
    p.add_argument("--resume", action="store_true", help="continue each phase from its last/ checkpoint")
    p.add_argument("--init", help="model folder SFT starts from (default: runs/NAME/pretrain/best)")
    add_dataclass_args(p, TrainConfig)
    add_dataclass_args(p, GPTConfig, prefix="model-")
    p.set_defaults(handler=_train)

    p = sub.add_parser("eval", help="validation loss and bits per byte of a checkpoint, per cache source")
    p.add_argument("--ckpt", required=True, help="model folder (e.g. runs/NAME/sft/best)")
    p.add_argument("--cache", required=True, help="token cache folder")
    p.add_argument("--batches", type=positive, default=50, help="validation batches per source (default: 50)")
    p.add_argument("--batch-size", type=positive, default=8, help="rows per batch (default: 8)")
    p.add_argument("--device", default="auto", help="auto | cuda | mps | cpu (default: auto)")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("plan", help="pick micro_batch / accum_steps / checkpointing for a memory budget")
    p.add_argument("--config", help="TOML with [train] and [model] tables to plan for")
    p.add_argument("--device", choices=("mps", "cuda", "cpu"),
                   help="device to plan for (default: the config's device, else mps)")
    p.add_argument("--memory", default="16GB", help="device (unified) memory, e.g. 16GB, 80GB (default: 16GB)")
    p.add_argument("--batch-tokens", type=int,
                   help="target tokens per optimizer step (default: the config's micro_batch x accum_steps x "
                        "seq_len, else 65536)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the config's, else 1024)")
    p.add_argument("--write", help="write the planned config as TOML to this path")
    add_dataclass_args(p, GPTConfig, prefix="model-")
    p.set_defaults(handler=_plan)

    p = sub.add_parser("plot", help="loss and bits-per-byte curves of a run as PNG files")
    p.add_argument("run", help="run folder (runs/NAME)")
    p.set_defaults(handler=_plot)

    p = sub.add_parser("quickstart", help="the whole pipeline at a small scale, offline, in minutes")
    p.add_argument("--out", default="runs/quickstart", help="folder for tokenizer, cache and run "
                                                             "(default: runs/quickstart)")
    p.add_argument("--data-dir", help="local data mirror: use the real datasets instead of the embedded text")
    p.add_argument("--config", help="a recipe TOML ([recipe], [train], [model]), e.g. configs/v1.toml: the real "
                                    "recipe, judged on held-out prompts at the end")
    from pocketlm.train.quickstart import CONFIG

    shipped = load_toml(CONFIG).get("train", {})
    p.add_argument("--steps", type=positive, help=f"optimizer steps per phase (default: up to "
                   f"{shipped.get('pretrain_steps')} pretrain steps, with early stopping, and "
                   f"{shipped.get('sft_steps')} SFT steps; with --config, that file's)")
    p.add_argument("--device", default="auto", help="auto | cuda | mps | cpu (default: auto)")
    p.add_argument("--fresh", action="store_true", help="delete this quickstart's tokenizer, cache and run and "
                                                         "start over (default: continue, or do nothing if finished)")
    p.set_defaults(handler=_quickstart)

    p = sub.add_parser("doctor", help="what this machine does with pocketlm, measured, as JSON to paste into an issue")
    p.add_argument("--config", help="TOML with [train]/[model] (default: configs/m4_16gb.toml if found, else the "
                                    "TrainConfig defaults)")
    p.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one untimed)")
    p.add_argument("--micro-batch", type=int, help="rows per step (default: the config's)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the config's)")
    p.add_argument("--precision", help="auto | fp32 | bf16 | fp16 (default: the config's on its device, else auto)")
    p.add_argument("--model-preset", choices=("v1", "tiny"), help="model preset instead of the config's model")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens of the timed generation")
    p.add_argument("--prompt-tokens", type=int, default=100, help="prompt length of the timed generation")
    p.set_defaults(handler=_doctor)
