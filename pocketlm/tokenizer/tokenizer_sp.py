"""The SentencePiece unigram tokenizer: training, loading, lossless encode/decode.

Owns the special tokens and their fixed ids, and the byte view of every id that the cache and the
inspector rely on. It knows nothing about chats (see `chat_template.py`) or data sources.

Lossless by construction: byte fallback (no `<unk>` for real text), identity normalization, no dummy
prefix, no whitespace folding, and `decode` is a byte-table lookup that inverts `encode` exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pocketlm import PocketLMError
from pocketlm.files import atomic_write
from pocketlm.tokenizer.config import TokenizerTrainConfig

# Control symbols: ids 1..4 in this order (0 is <unk>). Content text never encodes to them.
SPECIAL_TOKENS = ("<|sys|>", "<|usr|>", "<|asst|>", "<|eot|>")
MODEL_FILE = "tokenizer.model"
TRAIN_INFO_FILE = "tokenizer_train.json"

# SentencePiece skips "sentences" longer than max_sentence_length bytes, so documents are cut into
# chunks of at most this many characters (4 UTF-8 bytes each at worst) before training.
CHUNK_CHARS = 2048
# EM statistics are summed per thread, so the thread count is part of what makes a model
# reproducible: fixed, not os.cpu_count().
TRAIN_THREADS = 2

# Characters that are always pieces of their own, never only byte pieces: printable ASCII, printable
# Latin-1 and the commonest typographic punctuation. With character_coverage=1.0 (every character seen
# in training is a piece too), byte fallback is left to characters rare enough to be unseen. That is
# what lets llama.cpp, whose unigram tokenizer has no byte fallback, tokenize text as pocketlm does.
REQUIRED_CHARS = ("".join(chr(c) for c in range(0x21, 0x7F)) + "".join(chr(c) for c in range(0xA1, 0x100) if c != 0xAD)
                  + "\u2013\u2014\u2018\u2019\u201c\u201d\u2022\u2026\u20ac")  # – — ‘ ’ “ ” • … €

# SentencePiece writes spaces as U+2581 and turns U+2581 back into a space on decode, so a literal
# U+2581 in the text is encoded as its UTF-8 bytes instead.
_SPACE_MARK = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
# A self-check that a loaded model keeps whitespace, newlines and tabs as they are.
_PROBE = "a  b\n\n\tc \u2581 d\r\n"


def _chunks(text: str, max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut a document into pieces of at most max_chars, at line ends where possible, else at spaces.

    Newlines stay inside chunks so the model learns them as pieces (SentencePiece strips them only at
    the end of each training sentence).
    """
    buf = ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # one very long line: cut at the last space that fits
            cut = line.rfind(" ", 1, max_chars)
            cut = cut if cut > 0 else max_chars
            if buf:
                yield buf
                buf = ""
            yield line[:cut]
            line = line[cut:]
        if len(buf) + len(line) > max_chars:
            yield buf
            buf = ""
        buf += line
    if buf:
        yield buf


class _Sample:
    """Reservoir sample (Algorithm R, seeded) of the corpus' training chunks, with counts.

    Sampling here rather than with sentencepiece's input_sentence_size: sentencepiece latches its
    random seed at the first training in a process, so a later seed would be silently ignored.
    """

    def __init__(self, corpus_iter: Iterable[str], max_sentences: int, seed: int) -> None:
        if max_sentences < 1:
            raise PocketLMError(f"max_sentences must be at least 1, got {max_sentences}")
        rng = random.Random(seed)
        self.chunks: list[str] = []
        self.documents = self.chars = self.sentences = 0
        for doc in corpus_iter:
            if not isinstance(doc, str):
                raise PocketLMError(f"corpus item {self.documents} is {type(doc).__name__}, not str: "
                                    "the training corpus must yield text strings")
            self.documents += 1
            self.chars += len(doc)
            for chunk in _chunks(doc):
                if not chunk.strip():
                    continue
                if len(self.chunks) < max_sentences:
                    self.chunks.append(chunk)
                else:
                    j = rng.randrange(self.sentences + 1)
                    if j < max_sentences:
                        self.chunks[j] = chunk
                self.sentences += 1


def train_tokenizer(corpus_iter: Iterable[str], vocab_size: int = TokenizerTrainConfig.vocab_size,
                    special_tokens: Sequence[str] = SPECIAL_TOKENS, out_dir: str | Path = "tokenizer",
                    seed: int = TokenizerTrainConfig.seed,
                    max_sentences: int = TokenizerTrainConfig.max_sentences) -> Path:
    """Train a unigram model on an iterator of documents; write `out_dir/tokenizer.model`.

    Chunks beyond `max_sentences` are a seeded reservoir sample. Deterministic: the same documents,
    seed and cap give a byte-identical model file. Beside it, `tokenizer_train.json` records the
    seed, the cap and how much text was seen.
    Extra special tokens may follow the four of SPECIAL_TOKENS (ids 5, 6, ...).
    """
    if tuple(special_tokens[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise PocketLMError(f"special_tokens must start with {', '.join(SPECIAL_TOKENS)} (fixed ids 1-4); "
                            f"got {', '.join(special_tokens)}")
    out = Path(out_dir).expanduser()
    t0 = time.perf_counter()
    sample = _Sample(corpus_iter, max_sentences, seed)
    if not sample.chunks:
        raise PocketLMError("the training corpus yielded no text: check the sources you passed")
    read_seconds = time.perf_counter() - t0
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample.chunks), model_writer=model,
            model_type="unigram", vocab_size=vocab_size,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, control_symbols=list(special_tokens),
            byte_fallback=True, character_coverage=1.0, required_chars=REQUIRED_CHARS,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
            max_sentence_length=4 * CHUNK_CHARS, num_threads=TRAIN_THREADS, minloglevel=1)
    except RuntimeError as e:  # sentencepiece reports bad settings (e.g. vocab too large) this way
        raise PocketLMError(training_error(str(e), vocab_size)) from e
    train_seconds = time.perf_counter() - t0 - read_seconds
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed training leaves no folder behind
    model_path = out / MODEL_FILE
    written = atomic_write(model_path, model.getvalue())
    info = {
        "model": MODEL_FILE, "sha256": written["sha256"],
        "vocab_size": vocab_size, "special_tokens": {t: i + 1 for i, t in enumerate(special_tokens)},
        "seed": seed, "max_sentences": max_sentences, "chunk_chars": CHUNK_CHARS,
        "num_threads": TRAIN_THREADS, "documents": sample.documents, "characters": sample.chars,
        "sentences": sample.sentences, "sampled": len(sample.chunks),
        "read_seconds": round(read_seconds, 2), "train_seconds": round(train_seconds, 2),
        "sentencepiece": spm.__version__,
    }
    atomic_write(out / TRAIN_INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())
    return model_path


def training_error(message: str, vocab_size: int) -> str:
    """SentencePiece's complaint as one line whose advice matches its cause."""
    last = message.strip().splitlines()[-1] if message.strip() else message
    # Every character of the text (character_coverage=1.0), the required ones, the 256 byte pieces and
    # the special tokens each take a piece before any longer piece is learnt.
    small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if small:
        need = int(small.group(2))
        return (f"--vocab-size {vocab_size} is too small: this text needs {need} pieces before any merge (one per "
                f"character it uses, the required characters, 256 byte pieces and the special tokens); "
                f"use --vocab-size {need} or more (a useful tokenizer needs several times that)")
    large = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if large:
        return (f"--vocab-size {vocab_size} is too large for this text: it supports at most {large.group(2)} "
                "pieces; lower --vocab-size or give more text")
    return f"tokenizer training failed: {last}"


def _piece_bytes(piece: str) -> bytes:
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace(_SPACE_MARK, " ").encode("utf-8")


class Tokenizer:
    """A loaded `tokenizer.model`. Ids: 0 `<unk>`, 1-4 the SPECIAL_TOKENS, then bytes and pieces.

    decode renders control ids (and `<unk>`) as their literal strings, e.g. "<|eot|>", unless
    `skip_special=True`; content ids decode to exactly the text they came from.
    """

    def __init__(self, model_path: Path) -> None:
        self.path = model_path
        data = model_path.read_bytes()
        self.hash = hashlib.sha256(data).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=data)
        n = self._sp.get_piece_size()
        self.vocab_size = n
        specials = {self._sp.id_to_piece(i): i for i in range(n) if self._sp.is_control(i)}
        expected = {t: i + 1 for i, t in enumerate(SPECIAL_TOKENS)}
        if any(specials.get(t) != i for t, i in expected.items()) or not self._sp.is_unknown(0):
            raise PocketLMError(f"{model_path}: not a pocketlm tokenizer (needs <unk>=0 and control tokens "
                                f"{', '.join(f'{t}={i}' for t, i in expected.items())}); "
                                "retrain it with 'pocketlm tokenizer train'")
        self._specials = specials
        self.sys_id, self.usr_id, self.asst_id, self.eot_id = (specials[t] for t in SPECIAL_TOKENS)
        meta = set(specials.values()) | {0}
        self._bytes = [b"" if i in meta else _piece_bytes(self._sp.id_to_piece(i)) for i in range(n)]
        self._literal = [self._sp.id_to_piece(i).encode() if i in meta else b for i, b in enumerate(self._bytes)]
        self._mark_ids = [self._byte_id(b) for b in _SPACE_MARK.encode("utf-8")]
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        if self.decode(self.encode(_PROBE)) != _PROBE:
            raise PocketLMError(f"{model_path}: this model changes whitespace or newlines on encode, so it is "
                                "not lossless; retrain it with 'pocketlm tokenizer train'")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.model`, or the one inside a folder."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / MODEL_FILE
        if not p.is_file():
            raise PocketLMError(f"tokenizer model {p} not found: pass a {MODEL_FILE} or its folder "
                                "(train one with 'pocketlm tokenizer train')")
        return cls(p)

    def _byte_id(self, byte: int) -> int:
        i = self._sp.piece_to_id(f"<0x{byte:02X}>")
        if i == 0:
            raise PocketLMError(f"{self.path}: byte piece <0x{byte:02X}> missing (trained without "
                                "byte fallback); retrain it with 'pocketlm tokenizer train'")
        return i

    def _encode_text(self, text: str) -> list[int]:
        if _SPACE_MARK not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(text.split(_SPACE_MARK)):
            if k:
                ids.extend(self._mark_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special strings in the text are plain text unless allow_special=True, in which
        case each literal occurrence becomes its single control id."""
        if not allow_special:
            return self._encode_text(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            ids.extend(self._encode_text(text[pos:m.start()]))
            ids.append(self._specials[m.group()])
            pos = m.end()
        ids.extend(self._encode_text(text[pos:]))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode(text)` of each text (content only: no control ids) as int32 arrays, in order.

        The fast path for bulk tokenization: one C++ call with the GIL released (threads calling it
        run in parallel), and the ids come back as arrays, with no Python int made per token.
        """
        if not any(_SPACE_MARK in t for t in texts):  # the usual case: one piece per text
            return list(self._sp.encode(list(texts), return_type="numpy", num_threads=1))
        # As in _encode_text: a literal U+2581 splits its text into parts, joined by the mark's bytes.
        parts = [t.split(_SPACE_MARK) for t in texts]
        flat = [p for ps in parts for p in ps]
        encoded = self._sp.encode(flat, return_type="numpy", num_threads=1)
        mark = np.asarray(self._mark_ids, dtype=np.int32)
        out: list[np.ndarray] = []
        at = 0
        for ps in parts:
            pieces = encoded[at:at + len(ps)]
            at += len(ps)
            joined = [a for piece in pieces for a in (mark, piece)][1:]
            out.append(joined[0] if len(joined) == 1 else np.concatenate(joined))
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids -> text. A byte sequence cut mid-character (a partial stream) decodes to U+FFFD."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise PocketLMError(f"token id {bad} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        table = self._bytes if skip_special else self._literal
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")

    def special_token_ids(self) -> dict[str, int]:
        return dict(self._specials)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The exact bytes an id stands for; b"" for <unk> and control ids."""
        if not 0 <= token_id < self.vocab_size:
            raise PocketLMError(f"token id {token_id} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        return self._bytes[token_id]

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 byte count of each id (int64, [vocab_size]); 0 for <unk> and control ids."""
        return np.array([len(b) for b in self._bytes], dtype=np.int64)
