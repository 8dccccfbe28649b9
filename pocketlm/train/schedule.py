"""Learning-rate schedules as pure functions of the step: linear warmup, then cosine or WSD decay."""

from __future__ import annotations

import math

from pocketlm import PocketLMError

SCHEDULES = ("cosine", "wsd")


def lr_at(step: int, peak: float, total: int, warmup: int, min_frac: float = 0.1,
          schedule: str = "cosine", decay_frac: float = 0.2) -> float:
    """LR for optimizer step `step` (0-based) of a phase of `total` steps.

    cosine: warmup, then half a cosine from peak down to min_frac*peak at the last step.
    wsd: warmup, hold the peak, then decay linearly over the last decay_frac of the steps; a run
    can be extended from any checkpoint taken before the decay starts.
    """
    if schedule not in SCHEDULES:
        raise PocketLMError(f"TrainConfig.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    floor = peak * min_frac
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = max(warmup, int(total * (1.0 - decay_frac)))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - 1 - decay_start))
    return peak - (peak - floor) * progress
