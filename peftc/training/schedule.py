"""The learning-rate schedule of ``peftc train``: linear warm-up, then constant, linear or cosine decay."""
from __future__ import annotations

import math


def lr_at(step: int, total: int, base: float, schedule: str = "cosine", warmup: int = 0) -> float:
    """The learning rate of (0-based) ``step`` of ``total``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
