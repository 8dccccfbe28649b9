"""`pocketlm cache build` (tokenize sources into a cache) and `pocketlm cache info` (describe one)."""

from __future__ import annotations

import argparse

from pocketlm import PocketLMError
from pocketlm.cache.config import CacheConfig
from pocketlm.config import add_dataclass_args, load_toml, resolve


def register(sub) -> None:
    p = sub.add_parser("cache", help="tokenize data once into a sharded token cache")
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=type(p))
    cache_sub.required = True
    build = cache_sub.add_parser("build", help="build a cache from pretrain and sft source specs")
    build.add_argument("--config", help="TOML file whose [cache] section sets these options")
    add_dataclass_args(build, CacheConfig, required=("tokenizer", "out"))
    build.set_defaults(handler=_build)
    info = cache_sub.add_parser("info", help="check a cache and print what it holds")
    info.add_argument("dir", help="cache folder")
    info.add_argument("--verify", choices=("sha256", "size"), default="sha256",
                      help="how to check the files: sha256 reads every byte, size is quick")
    info.set_defaults(handler=_info)


def _build(args: argparse.Namespace) -> int:
    from pocketlm.cache.build_cache import build_cache

    toml = load_toml(args.config, "cache") if args.config else None
    cfg = resolve(CacheConfig, args, toml, where=args.config or "flags")
    if cfg.tokenizer is None or cfg.out is None:
        raise PocketLMError("cache build needs --tokenizer PATH and --out DIR")
    specs = [(s, "pretrain") for s in cfg.pretrain] + [(s, "eval") for s in cfg.eval] + [(s, "sft") for s in cfg.sft]
    meta = build_cache(cfg.tokenizer, specs, cfg.out, cfg.seed, cfg.data_dir, val_fraction=cfg.val_fraction,
                       workers=cfg.workers, shard_tokens=cfg.shard_tokens, sft_mask=cfg.sft_mask)
    print(describe(meta))
    return 0


def _info(args: argparse.Namespace) -> int:
    from pocketlm.cache.shards import Cache

    print(describe(Cache(args.dir, verify=args.verify).meta))
    return 0


def describe(meta: dict) -> str:
    tok = meta["tokenizer"]
    lines = [f"token cache v{meta['format_version']}: {meta['dtype']} ids, vocab {tok['vocab_size']}, "
             f"tokenizer {tok['path']} (sha256 {tok['sha256'][:12]}…), seed {meta['seed']}, "
             f"val_fraction {meta['val_fraction']}"]
    for name, src in sorted(meta["sources"].items()):
        kind = "eval" if src.get("eval_only") else src["kind"]
        lines.append(f"{name} ({kind}, spec {src['spec']!r}): {len(src['shards'])} shard(s)")
        for split, c in src["counts"].items():
            extra = f", {c['supervised_tokens']:,} supervised" if "supervised_tokens" in c else ""
            lines.append(f"  {split:5s} {c['docs']:>9,} docs {c['tokens']:>13,} tokens "
                         f"{c['text_bytes']:>13,} text bytes{extra}")
        lines += [f"  dropped {n:,}: {why}" for why, n in src["dropped"].items()]
    return "\n".join(lines)
