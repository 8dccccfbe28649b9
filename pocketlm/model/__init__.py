"""The model stage: GPT (one forward for training, prefill and decode), its config, save/load, HF bridge."""

from pocketlm.model.config import GPTConfig
from pocketlm.model.gpt_v1 import GPT

__all__ = ["GPT", "GPTConfig"]
