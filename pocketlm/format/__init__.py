"""Training formats: how documents and chats become token ids and loss labels.

`sft` (chat -> ids + labels), `pretrain` (document -> ids ending in the boundary token, window
positions) and `packing` (best-fit packing of conversations into rows, truncation, attention masks).
This stage knows nothing about files: the cache stage stores what these functions produce.
"""

from pocketlm.format.sft import IGNORE_INDEX

__all__ = ["IGNORE_INDEX"]
