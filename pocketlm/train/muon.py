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


def muon_updates(grads: torch.Tensor, momenta: list[torch.Tensor], beta: float, blocks: int,
                 keep: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Nesterov momentum, orthogonalised per block, scaled so tall and wide matrices move alike.

    `grads` stacks same-shape gradients (overwritten), orthogonalised as one batch: a few kernel
    launches instead of a few per matrix. Where `keep` is false the momenta stay and the updates are 0."""
    _lerp_(momenta, list(grads.unbind(0)), _rate(1 - beta, 0.0, keep))
    g = grads.lerp_(torch.stack(momenta), beta)
    n, rows, cols = g.shape[0], g.shape[1] // blocks, g.shape[2]
    scale = _rate(math.sqrt(max(1.0, rows / cols)), 0.0, keep)
    u = orthogonalize(g.view(n * blocks, rows, cols)).view_as(g) * scale
    return list(u.unbind(0))


def _rate(taken: float, skipped: float, keep: torch.Tensor | None) -> float | torch.Tensor:
    """`taken`, or without a host read a 0-d device tensor that is `skipped` where `keep` is false."""
    return taken if keep is None else torch.where(keep, taken, skipped)


def _lerp_(starts: list[torch.Tensor], ends: list[torch.Tensor], weight: float | torch.Tensor) -> None:
    torch._foreach_lerp_(starts, ends, weight if isinstance(weight, float) else [weight] * len(starts))


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `muon=True` take Muon steps (lr, momentum, weight_decay, blocks per parameter);
    the others take AdamW steps (lr, betas, eps, weight_decay). Weight decay is decoupled in both.

    A step whose gradients are not finite is skipped on the device, never read on the host: the loop
    (bf16/fp32) or GradScaler (fp16) sets `found_inf`, a 0-d device tensor, non-zero to skip, as for
    torch's fused AdamW. The gradients are then zeroed where skipped (an inf times 0 is NaN) and every
    change of a weight or of the state goes through a rate chosen by `torch.where` (0, or a factor 1,
    when skipped): a skipped step leaves everything bit for bit, a taken one computes what it would
    without `found_inf`."""

    # GradScaler passes `found_inf` (and `grad_scale` when the gradients are still scaled) as attributes
    # and calls step() whatever they hold, instead of reading found_inf on the host first.
    _step_supports_amp_scaling = True

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95) -> None:
        defaults = dict(lr=1e-3, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0, muon=False,
                        blocks=1, fused=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        keep = None if found_inf is None else found_inf == 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale)
            if group["weight_decay"]:
                torch._foreach_mul_(params, _rate(1 - group["lr"] * group["weight_decay"], 1.0, keep))
            if not group["muon"]:
                if keep is not None:
                    grads = [torch.where(keep, g, 0.0) for g in grads]
                self._adamw(params, grads, group, keep)
                continue
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(p.shape), []).append(i)
                if not self.state[p]:
                    self.state[p]["momentum"] = torch.zeros_like(p)
            for idx in by_shape.values():
                same = [params[i] for i in idx]
                stacked = torch.stack([grads[i] for i in idx])
                if keep is not None:
                    stacked.masked_fill_(~keep, 0.0)
                updates = muon_updates(stacked, [self.state[p]["momentum"] for p in same], group["momentum"],
                                       group["blocks"], keep)
                torch._foreach_add_(same, updates, alpha=-group["lr"])
        return None

    def _adamw(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict,
               keep: torch.Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif state["step"].device != p.device:  # checkpoints kept the count on the host before
                state["step"] = state["step"].to(p.device, torch.float32)
        steps = [s["step"] for s in states]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        # The count stays on the device and a skipped step does not count. The bias corrections use the
        # count this step reaches if taken (when skipped, the count 0 of a first step would divide by 0).
        t = torch.stack(steps) + 1
        # A list: the overload taking one 0-d tensor reads it on the host (CPU), the list overload does not.
        torch._foreach_add_(steps, 1.0 if keep is None else [keep] * len(steps))
        _lerp_(exp_avgs, grads, _rate(1 - beta1, 0.0, keep))
        torch._foreach_mul_(exp_avg_sqs, _rate(beta2, 1.0, keep))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, list((1 - beta2 ** t).unbind(0)))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        step_size = -group["lr"] / (1 - beta1 ** t)
        if keep is not None:
            step_size = torch.where(keep, step_size, 0.0)
        torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, list(step_size.unbind(0))), denom)


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
