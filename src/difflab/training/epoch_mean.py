"""The epoch's mean training loss, kept in the checkpoint.

Lightning's `on_epoch=True` mean lives in the loop's logging results, which a checkpoint does
not hold: a run resumed mid-epoch logged the mean of the batches after the restart only.
`EpochMean` is the same batch-size-weighted mean with a state a module saves and restores.
"""

from __future__ import annotations

import torch


class EpochMean:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # Sum of loss x batch size (a tensor on the loss's device: no sync per step), and images.
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, value: torch.Tensor, batch_size: int) -> None:
        self.total = self.total + value.detach().float() * batch_size
        self.count += int(batch_size)

    def mean(self) -> float | None:
        return float(self.total) / self.count if self.count else None

    def state_dict(self) -> dict[str, float]:
        return {"total": float(self.total), "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])
