"""EMA snapshots at wall-clock marks: what a run had learned after 1, 2.5, 5 ... minutes.

`make ttq` scores these to draw FID against wall time; any run can keep them
(`callbacks=wallclock`). Time counts from `start_time` (a Unix time: the benchmark passes
the moment it launched the process, so start-up is included), else from when the callback
was built. Each snapshot is an `ema.pt`-format file, so difflab-sample and difflab-evaluate
read it, and `wallclock.json` lists every mark with the time and step it was taken at.
A mark the run does not reach is not written (the json says where the run ended).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from difflab.metrics import report
from difflab.metrics.report import replacing
from difflab.training.callbacks import ema_payload
from difflab.training.ema import EMA, ema_module


def snapshot_name(mark_s: float) -> str:
    return f"wall-{mark_s:07.1f}s.pt"


def check_marks(marks_s: Sequence[float]) -> list[float]:
    """The marks as floats; an error unless they are finite, positive and rising."""
    marks = [float(m) for m in marks_s]
    if not marks or not all(0 < m < math.inf for m in marks) or marks != sorted(set(marks)):
        raise ValueError(f"marks_s must be positive, rising seconds, got {list(marks_s)}")
    return marks


class WallClockSnapshots(Callback):
    """Write the EMA weights at each wall-clock mark (seconds), checked after every step."""

    def __init__(self, marks_s: Sequence[float], dirpath: str = "checkpoints/wallclock",
                 start_time: Optional[float] = None) -> None:
        self.marks, self.dirpath = check_marks(marks_s), Path(dirpath)
        self.start = time.time() if start_time is None else float(start_time)
        self.taken: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return time.time() - self.start

    def _pending(self) -> list[float]:
        return self.marks[len(self.taken):]

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if not any(isinstance(callback, EMA) for callback in trainer.callbacks):
            raise ValueError("callbacks.wallclock_snapshots keeps the EMA weights at each mark, but this run has no "
                             "EMA callback: keep callbacks.ema (callbacks=wallclock adds both)")

    def state_dict(self) -> dict[str, Any]:
        """The marks already taken travel with last.ckpt: a resumed run does not write them again."""
        return {"taken": list(self.taken)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.taken = list(state_dict.get("taken", []))

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, *args: Any) -> None:
        pending = self._pending()
        if not pending or self.elapsed() < pending[0]:
            return
        payload = ema_payload(ema_module(trainer, pl_module), trainer) if trainer.is_global_zero else None
        for mark in pending:  # a slow step can pass several marks: each gets these weights
            if self.elapsed() < mark:
                break
            if payload is not None:
                self._write(mark, payload, trainer.global_step)
            self.taken.append({"mark_s": mark, "elapsed_s": round(self.elapsed(), 2), "step": trainer.global_step,
                               "file": snapshot_name(mark)})
        self._record(trainer, ended=False)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._record(trainer, ended=True)

    def _write(self, mark: float, payload: dict[str, Any], step: int) -> None:
        with replacing(self.dirpath / snapshot_name(mark)) as tmp:
            torch.save({**payload, "wallclock": {"mark_s": mark, "elapsed_s": self.elapsed(), "step": step}}, tmp)

    def _record(self, trainer: "pl.Trainer", ended: bool) -> None:
        if not trainer.is_global_zero:
            return
        record = {"start_time": self.start, "marks_s": self.marks, "snapshots": self.taken,
                  "ended": {"elapsed_s": round(self.elapsed(), 2), "step": trainer.global_step} if ended else None}
        report.write_text(self.dirpath / "wallclock.json", json.dumps(record, indent=1) + "\n")
