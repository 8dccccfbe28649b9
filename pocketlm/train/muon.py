"""Muon for the hidden weight matrices, AdamW for everything else, as one torch Optimizer.

Muon (Keller Jordan, used by modded-nanogpt and nanochat) replaces each 2-D hidden matrix's update with
the nearest semi-orthogonal matrix to its Nesterov momentum, found by a few Newton-Schulz iterations.
The embedding (tied with the output head here), the RMSNorm gains and anything else not 2-D keep AdamW.

One Optimizer object, so GradScaler (fp16 on MPS), `state_dict()` resume and the training loop's
`opt.param_groups` work unchanged. Only plain tensor ops: it runs the same on CUDA, MPS and CPU (no
fused or CUDA-only kernels); the orthogonalisation runs in bf16 on CUDA and fp32 elsewhere (fp16 would
overflow in X @ X.T).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pocketlm import PocketLMError
from pocketlm.train.optim import build_adamw, param_groups

# Quintic Newton-Schulz coefficients tuned for speed of convergence of the singular values to ~1
# (modded-nanogpt); 5 steps leave them in roughly [0.7, 1.2], which is all the update needs.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# A fused projection of `k` stacked matrices (qkv: q, k and v; gate_up: gate and up) is orthogonalised
# per block, as if the blocks were separate weights.
FUSED_BLOCKS = {"attn.qkv.weight": 3, "mlp.gate_up.weight": 2}


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U·Vᵀ of g = U·S·Vᵀ, for a matrix or a batch of matrices (..., rows, cols)."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.device.type == "cuda" else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def muon_updates(grads: list[torch.Tensor], momenta: list[torch.Tensor], beta: float,
                 blocks: int) -> list[torch.Tensor]:
    """Nesterov momentum, orthogonalised per block, scaled so tall and wide matrices move alike.

    `grads` all have one shape: they are stacked and orthogonalised as one batch (a few kernel
    launches instead of a few per matrix)."""
    torch._foreach_lerp_(momenta, grads, 1 - beta)
    g = torch.stack(grads).lerp_(torch.stack(momenta), beta)
    n, rows, cols = g.shape[0], g.shape[1] // blocks, g.shape[2]
    u = orthogonalize(g.view(n * blocks, rows, cols)).view_as(g) * math.sqrt(max(1.0, rows / cols))
    return list(u.unbind(0))


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `muon=True` take Muon steps (lr, momentum, weight_decay, blocks per parameter);
    the others take AdamW steps (lr, betas, eps, weight_decay). Weight decay is decoupled in both."""

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95) -> None:
        defaults = dict(lr=1e-3, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0, muon=False,
                        blocks=1, fused=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["weight_decay"] and params:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            if not group["muon"]:
                for p in params:
                    self._adamw(p, self.state[p], group)
                continue
            by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
            for p in params:
                by_shape.setdefault(tuple(p.shape), []).append(p)
                if not self.state[p]:
                    self.state[p]["momentum"] = torch.zeros_like(p)
            for same in by_shape.values():
                updates = muon_updates([p.grad for p in same], [self.state[p]["momentum"] for p in same],
                                       group["momentum"], group["blocks"])
                torch._foreach_add_(same, updates, alpha=-group["lr"])
        return None

    @staticmethod
    def _adamw(p: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def muon_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float) -> list[dict]:
    """Hidden 2-D matrices (the residual blocks' projections) -> Muon, grouped by how many fused blocks
    each holds; the embedding and the norms -> AdamW without decay (as in `optim.param_groups`).
    Muon's LR is `ratio` times AdamW's `lr`; each group keeps its scale as `lr_scale`, see `set_lr`."""
    matrices, others = param_groups(model, weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    by_blocks: dict[int, list[torch.Tensor]] = {}
    for p in matrices["params"]:
        blocks = next((k for suffix, k in FUSED_BLOCKS.items() if names[id(p)].endswith(suffix)), 1)
        by_blocks.setdefault(blocks, []).append(p)
    # Decoupled decay shrinks weights by lr * weight_decay a step; Muon's LR is ~10x AdamW's, so its
    # coefficient is scaled down to shrink the matrices at the rate AdamW would.
    groups = [{"params": ps, "muon": True, "blocks": k, "lr": lr * ratio, "lr_scale": ratio,
               "weight_decay": weight_decay / ratio} for k, ps in sorted(by_blocks.items())]
    return groups + [{**others, "muon": False, "lr": lr, "lr_scale": 1.0}]


def build_optimizer(model: nn.Module, cfg, peak_lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The phase's optimizer from TrainConfig: `muon` (Muon + AdamW) or `adamw` (AdamW alone).
    Muon's peak keeps the config's ratio muon_lr / lr, so SFT's lower LR lowers both."""
    if cfg.optimizer == "adamw":
        return build_adamw(model, peak_lr, cfg.weight_decay, cfg.beta2, device)
    if cfg.optimizer != "muon":
        raise PocketLMError(f"TrainConfig.optimizer={cfg.optimizer!r}: use muon or adamw")
    if cfg.muon_lr <= 0 or cfg.lr < 0:
        raise PocketLMError(f"TrainConfig.muon_lr={cfg.muon_lr} must be > 0 and lr={cfg.lr} >= 0")
    ratio = cfg.muon_lr / cfg.lr if cfg.lr > 0 else 1.0  # lr 0: every LR is 0 whatever the ratio
    groups = muon_groups(model, peak_lr, ratio, cfg.weight_decay)
    return MuonAdamW(groups, betas=(0.9, cfg.beta2), momentum=cfg.muon_momentum)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Give every group the schedule's LR, times its own scale (Muon's peak is not AdamW's)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
