"""Streaming detokenization: turn a growing list of token ids into text deltas.

Decoding one token at a time corrupts characters whose UTF-8 bytes are split across byte-fallback
tokens (an emoji is often four tokens). Instead we decode a short window of the accumulated ids and
emit the new suffix only once it no longer ends in U+FFFD, so every delta is complete characters.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special: bool = False) -> str: ...


class StreamDecoder:
    """Feed ids with `push`; each call returns the text that became complete ("" while held back).

    The decode window restarts after each emitted delta, so a step decodes a few ids, not the whole
    reply. Bytes that never form a valid character (a small model can emit a stray continuation byte)
    are left out of the text; callers still have every token's raw bytes.
    """

    def __init__(self, tok: Decoder) -> None:
        self._tok = tok
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here: one emitted delta back
        self._read = 0  # ids before this index have been emitted as text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        # Both decodes start at the same id, so a decoder that treats a sequence's first token specially
        # (SentencePiece can drop a leading word-boundary space) does so in both: the difference is the new text.
        prefix = self._tok.decode(self._ids[self._prefix:self._read], skip_special=True)
        full = self._tok.decode(self._ids[self._prefix:], skip_special=True)
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(prefix):].replace(REPLACEMENT, "")
