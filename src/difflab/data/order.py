"""The training order, resumable mid-epoch: a run resumed from any step sees the batches an
uninterrupted run would have seen.

PyTorch's `RandomSampler` draws each epoch's permutation from the global RNG when the epoch's
iterator starts, and a plain DataLoader restarts an epoch from its first batch, so a run
resumed mid-epoch trains on a different order (Lightning warns about it). `EpochOrder` draws
epoch e's permutation (and, for flipped datasets, each image's flip) from (seed, e) alone;
the datamodule keeps (seed, epoch, batches trained) in the checkpoint and starts the resumed
epoch at the next batch with `start_at`.

(Not Lightning's stateful-dataloader route: Lightning restores a loader's state only when it
builds the loader after the restore, and `trainer.estimated_stepping_batches`, which the LR
schedule reads in `configure_optimizers`, builds it before: the state was silently dropped.)
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import Sampler


class EpochOrder(Sampler[int]):
    """Epoch e's order is a permutation drawn from (seed, e); `flips` adds `size` to the index of
    each image drawn to be flipped (the dataset decodes it), so flips resume exactly too.

    `set_epoch` is called by Lightning at the start of every epoch; `start_at(epoch, n)` makes
    the next pass over `epoch` begin at its n-th index (a resumed run).
    """

    def __init__(self, size: int, seed: int, flips: bool = False) -> None:
        if size < 1:
            raise ValueError(f"EpochOrder over {size} items: there is nothing to draw")
        self.size, self.seed, self.flips = int(size), int(seed), bool(flips)
        self.epoch = 0
        self._resume: Optional[tuple[int, int]] = None  # (epoch, first index) of a resumed epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self._resume is not None and self._resume[0] != self.epoch:
            self._resume = None  # the resumed epoch had ended: this one starts at its beginning

    def start_at(self, epoch: int, index: int) -> None:
        self.epoch, self._resume = int(epoch), (int(epoch), int(index))

    def order(self, epoch: int) -> torch.Tensor:
        """The indices of `epoch`, in order (flipped images as index + size)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        indices = torch.randperm(self.size, generator=generator)
        if self.flips:
            indices = indices + self.size * (torch.rand(self.size, generator=generator) < 0.5)
        return indices

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start, self._resume = self._resume[1], None
        return iter(self.order(self.epoch)[start:].tolist())

    def __len__(self) -> int:
        return self.size
