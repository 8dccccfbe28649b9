"""GenConfig: how to generate; StatsRequest: which per-step statistics to report beside each token.

Pure Python (no torch import), so the CLI can build flags from them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pocketlm import PocketLMError

# The OpenAI API's range for frequency_penalty and presence_penalty.
PENALTY_RANGE = 2.0
# llama.cpp does not bound repeat_penalty; past 10 a repeated token is all but banned, so larger is a typo.
MAX_REPEAT_PENALTY = 10.0


@dataclass
class GenConfig:
    """How to generate. Batch size is always 1: one request, one sequence, one KV cache."""

    max_new_tokens: int = field(default=256, metadata={"help": "stop with reason 'length' after this many"})
    temperature: float = field(default=0.8, metadata={"help": "0 means greedy (argmax)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens; 0 = all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off"})
    seed: int | None = field(default=None, metadata={"help": "seed for sampling; None = nondeterministic"})
    # Penalties on tokens already seen, applied to the logits before temperature, top-k and top-p
    # (`infer/sampling.py`). Neutral values leave decoding exactly as without them.
    repeat_penalty: float = field(default=1.0, metadata={
        "help": "llama.cpp's repeat_penalty: a logit of a token among the last repeat_last_n (prompt "
                "included) is divided by it when positive, multiplied when not; 1.0 = off"})
    repeat_last_n: int = field(default=64, metadata={
        "help": "tokens the repeat penalty looks back over (llama.cpp's); 0 = off, -1 = the whole context"})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "OpenAI's: minus penalty x times the token was generated so far in this reply; -2..2, 0 = off"})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "OpenAI's: minus penalty once the token was generated in this reply; -2..2, 0 = off"})

    @property
    def repeat_on(self) -> bool:
        return self.repeat_penalty != 1.0 and self.repeat_last_n != 0

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (neutral settings take the exact unpenalized path)."""
        return self.repeat_on or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def validate(self) -> None:
        """Raise PocketLMError naming the field at fault."""
        if self.max_new_tokens < 1:
            raise PocketLMError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise PocketLMError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise PocketLMError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise PocketLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.repeat_penalty <= MAX_REPEAT_PENALTY:
            raise PocketLMError(f"repeat_penalty must be in (0, {MAX_REPEAT_PENALTY:g}] (1.0 = off), "
                                f"got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise PocketLMError(f"repeat_last_n must be -1 (the whole context), 0 (off) or a count of tokens, "
                                f"got {self.repeat_last_n}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -PENALTY_RANGE <= getattr(self, name) <= PENALTY_RANGE:
                raise PocketLMError(f"{name} must be in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}] (0 = off), "
                                    f"got {getattr(self, name)}")


@dataclass(frozen=True)
class StatsRequest:
    """What the caller (the inspector, the OpenAI logprobs) wants to know about each generated token.

    Logprob and entropy always come with a request; the rest on demand. The logit lens and attention
    entropy read activations through hooks, which keeps that generation on the eager path.
    """

    top_alternatives: int = field(default=5, metadata={"help": "alternatives recorded per step"})
    logit_lens: bool = field(default=False, metadata={"help": "record top tokens of every layer's residual"})
    lens_top: int = field(default=3, metadata={"help": "tokens recorded per layer by the logit lens"})
    attn_entropy: bool = field(default=False, metadata={"help": "record attention entropy per head"})

    @property
    def needs_hooks(self) -> bool:
        return self.logit_lens or self.attn_entropy

    def validate(self) -> None:
        """Raise PocketLMError naming the field at fault."""
        if not 0 <= self.top_alternatives <= 50:
            raise PocketLMError(f"top_alternatives must be in [0, 50], got {self.top_alternatives}")
        if not 1 <= self.lens_top <= 20:
            raise PocketLMError(f"lens_top must be in [1, 20], got {self.lens_top}")
