"""A test-only callback for tests/test_resume_equal.py, loaded into a real `difflab-train` run
with `+callbacks.signal_at._target_=signal_at.SignalAt` (tests/ on PYTHONPATH).

It sends a real SIGTERM to its own process at one chosen point of the run, as a cluster's
preemption would, so the point is exact from one test run to the next:
- `train_batch`: after training batch `batch` of epoch `epoch` (mid-epoch);
- `epoch_end`: at the end of epoch `epoch`, after the end-of-epoch work of the callbacks
  listed before this one (the sample grid, the FID callback);
- `validation`: as validation batch `batch` of the validation that ends epoch `epoch` starts;
- `sampling`: inside the `batch`-th call to `sample` of epoch `epoch`'s end (0: the sample
  grid, 1: the FID callback), while it samples: Lightning stops once the epoch's work is done.
It also writes the indices of every training batch it sees, so the test compares the data order.
It draws no random numbers and changes no weights.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    def __init__(self, at: Optional[str] = None, epoch: int = 0, batch: int = 0,
                 order_file: Optional[str] = None) -> None:
        if at not in (None, "train_batch", "epoch_end", "validation", "sampling"):
            raise ValueError(f"SignalAt: unknown point {at!r}")
        self.at, self.epoch, self.batch = at, int(epoch), int(batch)
        self.order_file = Path(order_file) if order_file else None
        self._sent = False

    def _send(self) -> None:
        if not self._sent:
            self._sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if self.at != "sampling" or trainer.current_epoch != self.epoch:
            return
        # The grid and the FID callback sample with the EMA copy, a module of the same class:
        # the class's `sample` sends the signal on its `batch`-th call, then is put back.
        cls, calls = type(pl_module), []
        original = cls.sample

        def sample(module: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == self.batch + 1:
                cls.sample = original
                self._send()
            return original(module, *args, **kwargs)

        cls.sample = sample

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.order_file is not None:  # the images of each step, by a checksum of their pixels
            images = batch[0]
            with open(self.order_file, "a") as handle:
                handle.write(json.dumps([trainer.global_step, float(images.double().sum()),
                                         float((images.double() ** 2).sum())]) + "\n")
        if self.at == "train_batch" and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self._send()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if self.at == "epoch_end" and trainer.current_epoch == self.epoch:
            self._send()

    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if (self.at == "validation" and not trainer.sanity_checking and trainer.current_epoch == self.epoch
                and batch_idx == self.batch):
            self._send()
