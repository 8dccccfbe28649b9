"""`pocketlm tokenizer train|info`: train the SentencePiece model on data sources, show its stats.

A source is a data source spec (`dolly`, `gutenberg:...`, see `pocketlm.data.sources`) or a path: a
.txt file (one document), a folder of .txt files, or a .jsonl file of `{"text"}` documents or
`{"messages"}` chats. A path is recognised by a path separator before any ':' or, without a ':',
by a .txt/.jsonl suffix; so a folder in the current directory is written `./books`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm import PocketLMError
from pocketlm.config import add_dataclass_args, resolve

if TYPE_CHECKING:  # the real import waits for a handler: it loads sentencepiece and numpy
    from pocketlm.tokenizer.tokenizer_sp import Tokenizer


@dataclasses.dataclass
class TokenizerTrainConfig:
    vocab_size: int = dataclasses.field(default=16000, metadata={"help": "pieces in the vocabulary"})
    max_sentences: int = dataclasses.field(
        default=50_000, metadata={"help": "cap on training chunks (<= 2 KB each); more are sampled with the seed"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the chunk sample"})
    holdout_every: int = dataclasses.field(
        default=50, metadata={"help": "every Nth document of the first source is held out to measure bytes/token"})


def _is_path(spec: str) -> bool:
    # Source specs may carry paths in their options (`gutenberg:path=/books`): look at the name only.
    name, colon, _ = spec.partition(":")
    return "/" in name or "\\" in name or (not colon and spec.endswith((".txt", ".jsonl")))


def _record_texts(rec: dict, where: str) -> Iterator[str]:
    """A document's text, or each message's content of a chat."""
    if isinstance(rec.get("text"), str):
        yield rec["text"]
    elif isinstance(rec.get("messages"), list):
        for i, m in enumerate(rec["messages"]):
            if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
                raise PocketLMError(f"{where}: messages[{i}] has no string 'content'; fix the record")
            yield m["content"]
    else:
        raise PocketLMError(f"{where}: record has neither a string 'text' nor a 'messages' list; "
                            "pass documents or chats")


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PocketLMError(f"{path}:{n}: invalid JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(rec, dict):
                raise PocketLMError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}:{n}", rec


def _read_text(path: Path) -> str:
    # utf-8-sig drops a BOM and universal newlines turn CRLF into \n: file artefacts, not text.
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PocketLMError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "convert it to UTF-8 or read it through its data source") from None


def source_documents(spec: str, data_dir: str | None) -> Iterator[list[str]]:
    """Each document of a source as its list of texts (one text, or a chat's message contents)."""
    if _is_path(spec):
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise PocketLMError(f"source folder {path} has no .txt files; pass a folder of .txt files")
            for f in files:
                yield [_read_text(f)]
        elif path.suffix == ".jsonl" and path.is_file():
            for where, rec in _jsonl_records(path):
                yield list(_record_texts(rec, where))
        elif path.is_file():
            yield [_read_text(path)]
        else:
            raise PocketLMError(f"source {spec}: no such file or folder; pass a .txt/.jsonl file, "
                                "a folder of .txt files, or a data source name")
        return
    from pocketlm.data.sources import open_source

    for n, rec in enumerate(open_source(spec, data_dir)):
        yield list(_record_texts(rec, f"source {spec} record {n}"))


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
