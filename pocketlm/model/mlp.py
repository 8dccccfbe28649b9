"""SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul.

Hidden size rule (`config.swiglu_hidden`): 8/3·C rounded up to a multiple of 64, which keeps the
parameter count of a 4·C GELU MLP; C=512 gives 1408.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.model.config import GPTConfig
from pocketlm.model.hooks import HookPoint


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.ffn_hidden is not None  # GPTConfig.__post_init__ fills it in
        self.hidden = cfg.ffn_hidden
        # Rows [0, F) are the gate projection, rows [F, 2F) the up projection (split in the HF bridge).
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp], gate pre-activation
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp], up projection
        self.hook_post = HookPoint()  # [batch, pos, d_mlp], silu(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        gate = self.hook_pre(gate)
        up = self.hook_pre_linear(up)
        return self.down(self.hook_post(F.silu(gate) * up))
