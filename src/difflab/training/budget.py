"""A run that ends early says so: step budget, time estimate, and a validation at the end.

`StepBudget` knows how many optimizer steps the run planned. After its first few dozen
steps it estimates the total training time and warns at once when that will not fit in
`max_time`, naming the likely cause. When training ends before the planned steps (the time
limit, an early-stopping callback, anything else) it says so in plain words and leaves the
outcome in `outcome` for the run's `result.json` (status `stopped_early`).

`ValidateAtEnd` makes the last training step validate whatever `check_val_every_n_epoch`
is, so a run of 1 epoch with validation every 5 still logs `val/loss` (and a run cut short
by `max_time` validates the weights it stopped with).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, Timer

log = logging.getLogger("difflab.train")
# Lightning's Timer runs after user callbacks on the same step: treat the last second of
# max_time as spent, so that the step we validate on is the step that ends training.
TIME_MARGIN_S = 1.0


def _timer(trainer: "pl.Trainer") -> Optional[Timer]:
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and getattr(callback, "_duration", None) is not None:
            return callback
    return None


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    minutes, secs = divmod(seconds, 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def out_of_time(timer: Optional[Timer]) -> bool:
    return timer is not None and (timer.time_remaining() or 0.0) <= TIME_MARGIN_S


def _planned_steps(trainer: "pl.Trainer") -> Optional[int]:
    try:
        planned = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - an infinite or unsized loader has no plan
        return None
    return int(planned) if planned != float("inf") else None


class StepBudget(Callback):
    """Estimate, warn, and report a training that stops before its planned steps.

    Args:
        estimate_after: steps (after `skip` warm-up steps) to time before estimating.
        skip: first steps left out of the rate (start-up, kernel selection).
        cause: a hint for the warning, e.g. "precision bf16-mixed measured 0.1x fp32 here".
        record: facts about the run kept beside the outcome (e.g. the precision decision).
    """

    def __init__(self, estimate_after: int = 30, skip: int = 5, cause: Optional[str] = None,
                 record: Optional[dict[str, Any]] = None) -> None:
        self.estimate_after, self.skip, self.cause = estimate_after, skip, cause
        self.record = dict(record or {})
        self.planned: Optional[int] = None
        self.outcome: dict[str, Any] = {}
        self.warning: Optional[str] = None
        self._start_step = 0
        self._clock: Optional[tuple[int, float]] = None
        self._estimated = False
        self._timer: Optional[Timer] = None

    def on_train_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._timer = _timer(trainer)  # looked up once: the callbacks do not change during fit
        self.planned = _planned_steps(trainer)
        self._start_step = trainer.global_step  # a resumed run counts from its checkpoint
        self._clock, self._estimated = None, False

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, *args: Any) -> None:
        done = trainer.global_step - self._start_step
        if self._estimated or self.planned is None:
            return
        if done == self.skip:
            self._clock = (trainer.global_step, time.perf_counter())
        elif self._clock is not None and done >= self.skip + self.estimate_after:
            self._estimated = True
            step0, t0 = self._clock
            rate = (trainer.global_step - step0) / max(time.perf_counter() - t0, 1e-9)
            self._check_fits(trainer, rate)

    def _check_fits(self, trainer: "pl.Trainer", rate: float) -> None:
        timer = self._timer if self._timer is not None else _timer(trainer)
        self.planned = _planned_steps(trainer) or self.planned  # a time budget may have shortened the plan
        remaining_steps = self.planned - trainer.global_step
        needed = remaining_steps / rate
        log.info("%.2f steps/s: the remaining %d of %d steps need about %s", rate, remaining_steps,
                 self.planned, _duration(needed))
        if timer is None:
            return
        left = timer.time_remaining()
        if left is None or needed <= left:
            return
        reachable = trainer.global_step + int(rate * left)
        cause = f" Likely cause: {self.cause}." if self.cause else ""
        self.warning = (
            f"training will not finish inside max_time: at {rate:.2f} steps/s the remaining {remaining_steps} "
            f"steps need about {_duration(needed)}, but max_time leaves {_duration(left)}, so it will stop near "
            f"step {reachable} of {self.planned}.{cause} To train every step, raise or clear trainer.max_time "
            "(null: no limit), or plan fewer steps (trainer.max_epochs)."
        )
        log.warning("%s", self.warning)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        steps = trainer.global_step
        self.planned = _planned_steps(trainer) or self.planned
        self.outcome = {"steps": steps, "planned_steps": self.planned}
        if self.warning:
            self.outcome["warning"] = self.warning
        if self.planned is None or steps >= self.planned or trainer.fast_dev_run:
            self.outcome["status"] = "ok"
            return
        timer = self._timer
        if out_of_time(timer):
            reason = f"max_time ({_duration(timer._duration)}) was reached"
        else:
            reason = "training was asked to stop (trainer.should_stop: an early-stopping callback?)"
        cause = f" Likely cause of the slowness: {self.cause}." if self.cause and "max_time" in reason else ""
        message = (
            f"training stopped early: {steps} of {self.planned} planned steps ({100 * steps / self.planned:.0f}%), "
            f"because {reason}.{cause} The checkpoint, samples and metrics are those of a shorter run than "
            "configured. To finish it, resume with ckpt_path=<run>/checkpoints/last.ckpt and a larger "
            "trainer.max_time (or trainer.max_time=null)."
        )
        self.outcome.update(status="stopped_early", stop_reason=reason, message=message)
        log.warning("%s", message)


class ValidateAtEnd(Callback):
    """Validate after the last training step, whatever the validation period.

    Lightning validates only in epochs that are a multiple of `check_val_every_n_epoch`, so
    a run that ends in another epoch (a short run, `max_steps`, `max_time`) would end with
    no `val/loss`. On the step that ends training, this lets the epoch validate and asks the
    loop to stop there (which is also what makes Lightning validate mid-epoch).
    """

    def __init__(self) -> None:
        self._period: Any = None
        self._forced = False
        self._timer: Optional[Timer] = None

    def on_train_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._timer = _timer(trainer)  # looked up once, not on every step

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, *args: Any) -> None:
        if self._forced or not trainer.enable_validation:
            return
        time_up = out_of_time(self._timer)
        if self._timer is not None and trainer.world_size > 1:
            # The clock differs between ranks: they must agree on the step that stops (and
            # validates), or one rank waits forever in the other's collective.
            time_up = trainer.strategy.reduce_boolean_decision(time_up, all=False)
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        last_batch = last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        out_of_steps = 0 < trainer.max_steps <= trainer.global_step
        if not (time_up or out_of_steps or last_batch or trainer.should_stop):
            return
        self._forced, self._period = True, trainer.check_val_every_n_epoch
        if self._period is not None:  # None: validation by steps, where should_stop alone suffices
            trainer.check_val_every_n_epoch = 1
        trainer.should_stop = True  # Lightning validates a step that asks to stop

    def on_train_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if self._forced:
            trainer.check_val_every_n_epoch = self._period
            self._forced = False
