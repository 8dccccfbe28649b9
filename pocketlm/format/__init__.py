"""Training formats: how documents and chats become token ids and loss labels.

`sft` (chat -> ids + labels), `pretrain` (document -> ids ending in the boundary token, window
positions) and `packing` (best-fit packing of conversations into rows, truncation, document ids).
This stage knows nothing about files: the cache stage stores what these functions produce.
"""

# The label of a token that takes no loss: torch's cross_entropy default ignore_index. Defined here,
# with no imports, so the model and the trainer can read it without loading the tokenizer.
IGNORE_INDEX = -100
