"""The benchmarks' peer: transformers' LlamaForCausalLM of the same shape, on the same weights
(through the HF bridge's key mapping)."""

from __future__ import annotations

import torch

from pocketlm.model.hf_bridge import hf_config, to_hf_state_dict


def hf_llama(model: torch.nn.Module, eot_id: int = 4, attn: str = "sdpa"):
    """An HF Llama with `model`'s weights, on its device and in its dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = next(model.parameters())
    conf = hf_config(model.cfg, eot_id, "float32")
    conf.pop("architectures"), conf.pop("model_type")
    hf = LlamaForCausalLM(LlamaConfig(**conf, attn_implementation=attn))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.to(device=p.device, dtype=p.dtype)
