"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay) or constant.

Torch-free and a pure function of the step, so a resumed run needs no scheduler state beyond the
step it resumes at.
"""

from __future__ import annotations

import math
from typing import Any


def lr_at(step: int, train: Any) -> float:
    """Learning rate for optimizer step `step` (0-based) of a TrainSpec `train`."""
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    warmup = min(train.warmup_steps, train.steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if train.schedule == "constant":
        return peak
    if train.schedule == "cosine":
        span = max(1, train.steps - warmup - 1)  # the last step reaches the floor
        progress = min(1.0, (step - warmup) / span)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of steps
    decay_steps = max(1, round(train.decay_fraction * train.steps))
    decay_start = max(warmup, train.steps - decay_steps)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / max(1, train.steps - decay_start))  # last = floor
    return peak + (floor - peak) * progress
