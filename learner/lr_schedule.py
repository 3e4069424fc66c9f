"""Learning-rate schedules of the learner's stages."""

from __future__ import annotations

import math


def cosine_lr(peak: float, step: int, total: int, warmup_frac: float = 0.05,
           floor_frac: float = 0.1) -> float:
    """Linear warm-up over the first 5% of steps (none with warmup_frac 0), then cosine decay
    towards 10% of the peak at the last step (SFT stages; RL stages with lr_schedule cosine)."""
    warm = max(1, int(total * warmup_frac)) if warmup_frac > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
