"""`pocketlm tokenizer train|info`: train the SentencePiece model on data sources, show its stats.

What a source may be (a data source spec or a path) is described in `pocketlm.tokenizer.corpus`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pocketlm import PocketLMError
from pocketlm.config import add_dataclass_args, resolve
from pocketlm.tokenizer.config import TokenizerTrainConfig
from pocketlm.tokenizer.corpus import source_documents

if TYPE_CHECKING:  # the real import waits for a handler: it loads sentencepiece and numpy
    from pocketlm.tokenizer.tokenizer_sp import Tokenizer


def _corpus(specs: list[str], data_dir: str | None, holdout_every: int, held_out: list[str]) -> Iterator[str]:
    """All texts of all sources, except every holdout_every-th document of the first (kept aside)."""
    for k, spec in enumerate(specs):
        for n, texts in enumerate(source_documents(spec, data_dir)):
            if k == 0 and n % holdout_every == holdout_every - 1:
                held_out.extend(texts)
            else:
                yield from texts


def bytes_per_token(tok: Tokenizer, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    return n_bytes / max(n_tokens, 1)


def _print_stats(tok: Tokenizer) -> None:
    """Vocabulary stats, plus the training record when the model sits beside its tokenizer_train.json."""
    from pocketlm.tokenizer.tokenizer_sp import TRAIN_INFO_FILE

    lengths = tok.token_byte_lengths()
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    print(f"model:         {tok.path}")
    print(f"sha256:        {tok.hash}")
    print(f"vocab size:    {tok.vocab_size}")
    print("special ids:   <unk>=0 " + " ".join(f"{t}={i}" for t, i in tok.special_token_ids().items()))
    print(f"byte pieces:   {sum(p.startswith('<0x') and p.endswith('>') for p in pieces)}")
    print(f"newline pieces: {sum(chr(10) in p for p in pieces)}, whitespace-only: "
          f"{sum(bool(p) and set(p) <= {chr(0x2581)} for p in pieces)}")
    print(f"piece bytes:   mean {lengths[lengths > 0].mean():.2f}, max {int(lengths.max())}")
    info_path = tok.path.parent / TRAIN_INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        print(f"trained on:    {info['documents']} documents, {info['characters'] / 1e6:.1f}M characters, "
              f"{info['sampled']} of {info['sentences']} chunks (cap {info['max_sentences']}, seed {info['seed']})")
        print(f"train time:    {info['read_seconds']} s reading + {info['train_seconds']} s sentencepiece")


def _train(args: argparse.Namespace) -> int:
    from pocketlm.tokenizer.tokenizer_sp import Tokenizer, train_tokenizer

    cfg = resolve(TokenizerTrainConfig, args, where="pocketlm tokenizer train")
    if cfg.holdout_every < 2:
        raise PocketLMError(f"--holdout-every must be at least 2, got {cfg.holdout_every}")
    if cfg.max_sentences < 1:
        raise PocketLMError(f"--max-sentences must be at least 1, got {cfg.max_sentences}")
    held_out: list[str] = []
    model_path = train_tokenizer(_corpus(args.sources, args.data_dir, cfg.holdout_every, held_out),
                                 vocab_size=cfg.vocab_size, out_dir=args.out, seed=cfg.seed,
                                 max_sentences=cfg.max_sentences)
    tok = Tokenizer.load(model_path)
    _print_stats(tok)
    if held_out:
        print(f"held out:      {len(held_out)} texts of {args.sources[0]}, "
              f"{bytes_per_token(tok, held_out):.3f} bytes/token")
    else:
        print(f"held out:      none ({args.sources[0]} has fewer than {cfg.holdout_every} documents)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from pocketlm.tokenizer.tokenizer_sp import Tokenizer

    _print_stats(Tokenizer.load(args.model))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect the SentencePiece tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", parser_class=type(p))
    tsub.required = True

    train = tsub.add_parser("train", help="train a unigram tokenizer on data sources")
    train.add_argument("--sources", nargs="+", required=True, metavar="SPEC",
                       help="data source specs or .txt/.jsonl paths; the first one provides the held-out slice")
    train.add_argument("--out", required=True, help="output folder for tokenizer.model")
    train.add_argument("--data-dir", default=None, help="local mirror of the data sources")
    add_dataclass_args(train, TokenizerTrainConfig)
    train.set_defaults(handler=_train)

    info = tsub.add_parser("info", help="print a tokenizer's vocabulary stats")
    info.add_argument("model", metavar="DIR_OR_MODEL", help="a tokenizer.model or its folder")
    info.set_defaults(handler=_info)
