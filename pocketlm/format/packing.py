"""Packing whole conversations into fixed rows of T tokens for fine-tuning.

A row holds several conversations, each with its own document id (attention stays inside it) and
positions restarting at 0, then padding with its own document id and no loss. Packing is
best-fit-decreasing: deterministic for a given list of lengths, and it wastes few pad tokens.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

from pocketlm.format import IGNORE_INDEX


def truncate_length(mask: np.ndarray, block_size: int) -> int:
    """How many leading tokens of a conversation to keep in a row of `block_size`; 0 = unusable.

    Token i is a target when mask[i] is set, and it is predicted from token i-1, so a kept prefix
    of k tokens needs some mask[j] with 1 <= j < k. A long conversation is cut so that it ends on
    a supervised token, i.e. inside an assistant span.
    """
    n = min(len(mask), block_size)
    supervised = np.flatnonzero(mask[1:n]) + 1
    if len(supervised) == 0:
        return 0
    return len(mask) if len(mask) <= block_size else int(supervised[-1]) + 1


def best_fit_pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into rows whose lengths sum to at most `capacity` (best-fit decreasing).

    Items are placed longest first (ties by index) into the open row with the least room that
    still fits; rows come out in the order they were opened.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity or n <= 0]
    if too_long:
        raise ValueError(f"item {too_long[0]} has length {lengths[too_long[0]]}, outside 1..{capacity}")
    rows: list[list[int]] = []
    # Rows grouped by their free room; `free` is the sorted list of room sizes some row has.
    by_room: dict[int, list[int]] = {}
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(free, n)
        if k < len(free):
            room = free[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                free.pop(k)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(free, left)
            by_room[left].append(row)
    return rows


def pack_row(convs: Sequence[tuple[np.ndarray, np.ndarray]], block_size: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """One row from (ids, mask) conversations that together fit in `block_size` tokens.

    Returns int64 arrays of length T: x, y (next token where it is supervised, else IGNORE_INDEX;
    the last token of a conversation predicts nothing), positions, doc_ids (0, 1, ... per
    conversation, then one more id for the padding).
    """
    x = np.full(block_size, pad_id, dtype=np.int64)
    y = np.full(block_size, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(block_size, dtype=np.int64)
    doc_ids = np.full(block_size, len(convs), dtype=np.int64)
    at = 0
    for d, (ids, mask) in enumerate(convs):
        n = len(ids)
        if at + n > block_size:
            raise ValueError(f"conversations need {at + n} tokens, more than block_size {block_size}")
        x[at:at + n] = ids
        y[at:at + n - 1] = np.where(mask[1:] != 0, ids[1:], IGNORE_INDEX)
        positions[at:at + n] = np.arange(n)
        doc_ids[at:at + n] = d
        at += n
    positions[at:] = np.arange(block_size - at)
    return {"x": x, "y": y, "positions": positions, "doc_ids": doc_ids}

