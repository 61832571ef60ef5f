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


class LRShape:
    """`lr_factor` as a LambdaLR callable whose length can be planned once the run has started.

    Its attributes are the scheduler's state (LambdaLR saves a callable object's `__dict__`),
    so a resumed run decays over the same `total` as the run it continues, also when a time
    budget (difflab.training.plan) chose that total.
    """

    def __init__(self, total: int, *, warmup_steps: int = 0, lr_schedule: str = "constant",
                 min_lr_ratio: float = 0.1) -> None:
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
        self.total, self.warmup_steps = max(int(total), 1), int(warmup_steps)
        self.lr_schedule, self.min_lr_ratio = lr_schedule, float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule,
                         min_lr_ratio=self.min_lr_ratio)
