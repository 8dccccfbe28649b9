"""Two checkpoints on the same text: each reads the same tokens, teacher-forced, and says how likely
it found each next token.

Per token: both models' probabilities and the change in bits, `log2 p_b - log2 p_a` (> 0: checkpoint B
finds the token more likely). The text is scored after an `<|eot|>`, as a document starts in pretraining,
so its first token has a prediction too. Probabilities are the models' own (log-softmax of the logits,
temperature 1), as in the inspector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TokenChange:
    index: int  # position in the text's tokens, from 0
    id: int
    logprob_a: float  # nats
    logprob_b: float
    delta_bits: float  # log2 p_b - log2 p_a

    def to_dict(self) -> dict:
        return {**asdict(self), "prob_a": math.exp(self.logprob_a), "prob_b": math.exp(self.logprob_b)}


@torch.no_grad()
def next_token_logprobs(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1 … len(ids) - 1, one teacher-forced forward, float64 on the CPU."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    logits, _ = model(x)
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return logprobs.gather(-1, x[0, 1:, None]).squeeze(-1).double().cpu()


def compare(model_a: nn.Module, model_b: nn.Module, text_ids: list[int], start_id: int) -> list[TokenChange]:
    """How each token of `text_ids` (read after `start_id`) changed from model A to model B."""
    ids = [start_id, *text_ids]
    a, b = next_token_logprobs(model_a, ids).tolist(), next_token_logprobs(model_b, ids).tolist()
    return [TokenChange(i, t, la, lb, (lb - la) / math.log(2)) for i, (t, la, lb) in enumerate(zip(text_ids, a, b))]
