"""How tokens are shown in JSON: a printable label and the raw UTF-8 bytes of each id, and finite numbers.

A byte-fallback token can hold part of a character; its label is then `bytes:\\xNN` (the OpenAI
convention), never a U+FFFD. Labels are computed once per vocabulary, not per step.
"""

from __future__ import annotations

import math

# JSON has no -inf: logprobs below this are sent as this value (the OpenAI API uses the same floor).
LOGPROB_FLOOR = -9999.0


class TokenTable:
    def __init__(self, tok) -> None:
        specials = set(tok.special_token_ids().values()) | {0}
        self.bytes = [tok.id_to_bytes(i) for i in range(tok.vocab_size)]
        self.labels = [tok.id_to_piece(i) if i in specials else _label(b) for i, b in enumerate(self.bytes)]

    def entry(self, token_id: int, logprob: float) -> dict:
        """`{id, token, bytes, logprob, prob}` for one token."""
        lp = finite_logprob(logprob)
        return {"id": token_id, "token": self.labels[token_id], "bytes": list(self.bytes[token_id]),
                "logprob": lp, "prob": math.exp(lp)}


def _label(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def finite_logprob(x: float) -> float:
    """Clamp to [LOGPROB_FLOOR, 0]; NaN is a bug upstream and must not be papered over."""
    if math.isnan(x):
        raise ValueError("NaN logprob: the model produced non-finite logits")
    return min(max(x, LOGPROB_FLOOR), 0.0)
