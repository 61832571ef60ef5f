"""The learning-rate shape every difflab module trains with: linear warm-up, then constant
or a cosine decay to a floor (Loshchilov & Hutter 2017, without restarts)."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, total: int, *, warmup_steps: int = 0, lr_schedule: str = "constant",
              min_lr_ratio: float = 0.1) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` of `total`."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
