"""Language-model loss straight from the final hidden states, without materialising the batch's logits.

The unembedding and the cross-entropy run in chunks of rows. The loss is the last operation of the
step, so its gradient with respect to each chunk's logits (softmax - one-hot) is known in the forward
already: each chunk's logits are made, turned into loss and gradients for the hidden states and the
weight, and dropped. Autograd then only scales the stored gradients by the incoming scalar. The
same three matmuls as the plain path, but no (tokens x vocab) fp32 tensor is ever stored: at B=32,
T=1024, V=16000 that tensor alone is 2 GB written and read several times per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pocketlm.format import IGNORE_INDEX

CHUNK_TOKENS = 8192  # rows of logits alive at once: 8192 x 16000 fp32 = 0.5 GB


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        w = weight.to(dtype)
        for i in range(0, h.shape[0], CHUNK_TOKENS):
            hc, yc = h[i:i + CHUNK_TOKENS].to(dtype), targets[i:i + CHUNK_TOKENS]
            valid = (yc != IGNORE_INDEX)[:, None]
            index = yc.clamp(min=0)[:, None]
            # Two passes over the (rows x vocab) block after the matmul: log-softmax (the logits are
            # dropped after it), then exp in place turns it into the softmax. Ignored rows are zeroed
            # on the narrow side (hidden states and their gradient), never across the vocabulary.
            logp = torch.log_softmax((hc @ w.t()).float(), dim=-1)
            total -= (logp.gather(1, index) * valid).sum()
            # d(sum of losses)/d(logits) = softmax - one-hot on counted rows, 0 on ignored rows.
            g = logp.exp_().scatter_add_(1, index, valid.to(logp.dtype).neg()).to(dtype)
            del logp
            grad_h[i:i + CHUNK_TOKENS] = ((g @ w) * valid).to(h.dtype)
            grad_w += (g.t() @ (hc * valid)).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over counted tokens of cross_entropy(h @ weight.T, targets) in fp32; h (N, C), targets (N,).

    Matmuls run in the autocast dtype when autocast is on (as F.linear would), else in h's dtype.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    if not (h.requires_grad or weight.requires_grad):
        logits = F.linear(h.to(dtype), weight.to(dtype)).float()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, dtype)
