"""Pretraining format: documents -> one token stream with `<|eot|>` as the document boundary.

Each document's ids are followed by `<|eot|>`. A training window cut from the stream may span
several documents; `window_positions` restarts RoPE positions and document ids after every
`<|eot|>` so the model can keep attention inside one document.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pocketlm.tokenizer.tokenizer_sp import Tokenizer


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Each document's ids followed by the boundary token `<|eot|>`, as int32 arrays, encoded in bulk
    (`Tokenizer.encode_batch`: no Python int per token)."""
    eot = np.int32(tok.eot_id)
    return [np.append(ids, eot) for ids in tok.encode_batch(texts)]


def window_positions(x: np.ndarray, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, doc_ids) for a (B, T) window of tokens.

    A new document starts at the token after each `<|eot|>`; the `<|eot|>` itself belongs to the
    document it closes. The window's first token gets position 0 even mid-document: what came
    before the window is not visible to the model.
    """
    b, t = x.shape
    starts = np.zeros((b, t), dtype=bool)
    starts[:, 1:] = x[:, :-1] == eot_id
    doc_ids = np.cumsum(starts, axis=1, dtype=np.int64)
    idx = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t))
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return idx - last_start, doc_ids
