"""A run planned to its time budget: as many epochs as fit on this machine, with the LR decayed over them.

`trainer.max_time` stops a run that is too slow wherever it happens to be: mid-decay, with a
learning rate still high and an EMA of weights that were never annealed. `TimeBudget` instead
measures the training rate over the run's first steps (inside the learning-rate warm-up, where
the plan does not yet change anything), then shortens `max_epochs` to what fits in
`trainer.budget_minutes` and sets the learning-rate decay's length to match. A run planned this
way is the same run, step for step, as one launched with `trainer.max_epochs=<planned>` and
no budget, which is what the log line says to type to repeat it on another machine.

The budget only ever shortens a plan: on a machine fast enough for `max_epochs` nothing
changes. The decision is kept in the checkpoint, so a resumed run keeps its plan.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from difflab.training.lr import LRShape

log = logging.getLogger("difflab.train")
# The measured rate leaves out what happens between steps: validation, sample grids, the FID
# callback, checkpoints and the end-of-training evaluation. On the default experiment these take
# about 15% of the training time (Intel-AMX, bf16: 33 s beside 3 min 00 s of steps), so the plan
# fills this fraction of the budget with steps.
STEP_FRACTION = 0.85


def _duration(seconds: float) -> str:
    minutes, secs = divmod(max(int(round(seconds)), 0), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def lr_shapes(trainer: "pl.Trainer") -> list[LRShape]:
    """The planned-length learning-rate shapes of the trainer's schedulers."""
    shapes = []
    for config in trainer.lr_scheduler_configs:
        shapes += [fn for fn in getattr(config.scheduler, "lr_lambdas", []) if isinstance(fn, LRShape)]
    return shapes


def plan_epochs(budget_s: float, elapsed_s: float, rate: float, step: int, steps_per_epoch: int,
                configured: int, current_epoch: int) -> int:
    """The whole epochs that fit: the steps done plus what the rest of the budget trains at
    `rate` (steps/s, times STEP_FRACTION), at least the epoch under way, at most `configured`."""
    reachable = step + max(budget_s - elapsed_s, 0.0) * rate * STEP_FRACTION
    return int(min(max(math.floor(reachable / steps_per_epoch), current_epoch + 1), configured))


class TimeBudget(Callback):
    """Shorten `max_epochs` to what fits in `minutes` here, measured over the first steps.

    Args:
        minutes: the training budget (validation, grids and the FID callback included).
        measure_steps: steps timed (after `skip` warm-up steps) before the plan is made.
        skip: first steps left out of the rate (start-up, kernel selection).
    """

    def __init__(self, minutes: float, measure_steps: int = 30, skip: int = 5) -> None:
        if not minutes > 0:
            raise ValueError(f"trainer.budget_minutes={minutes!r}: use a number of minutes > 0, or null (no budget)")
        self.budget_s, self.measure_steps, self.skip = 60.0 * float(minutes), int(measure_steps), int(skip)
        self.plan: dict[str, Any] = {}  # the decision, once made: kept in the checkpoint
        self._start: Optional[float] = None
        self._step0 = 0
        self._clock: Optional[tuple[int, float]] = None

    # -- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"plan": dict(self.plan)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan = dict(state_dict.get("plan") or {})

    # -- hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._start, self._step0, self._clock = time.perf_counter(), trainer.global_step, None
        if self.plan.get("planned_epochs"):  # a resumed run keeps the plan it made
            self._apply(trainer, int(self.plan["planned_epochs"]))
            log.info("time budget: the resumed run keeps its plan of %d epochs", self.plan["planned_epochs"])

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, *args: Any) -> None:
        if self.plan or self._start is None:
            return
        done = trainer.global_step - self._step0
        if done == self.skip:
            self._clock = (trainer.global_step, time.perf_counter())
        elif self._clock is not None and done >= self.skip + self.measure_steps:
            step0, t0 = self._clock
            now = time.perf_counter()
            self._decide(trainer, (trainer.global_step - step0) / max(now - t0, 1e-9), now - self._start)

    def _decide(self, trainer: "pl.Trainer", rate: float, elapsed_s: float) -> None:
        configured = trainer.max_epochs
        batches = trainer.num_training_batches
        if configured is None or configured < 1 or not math.isfinite(batches) or trainer.max_steps > 0:
            self.plan = {"budget_minutes": self.budget_s / 60, "planned_epochs": None,
                         "note": "not planned: the budget plans epochs (set trainer.max_epochs, not max_steps)"}
            log.warning("time budget: %s", self.plan["note"])
            return
        steps_per_epoch = max(math.ceil(batches / trainer.accumulate_grad_batches), 1)
        epochs = plan_epochs(self.budget_s, elapsed_s, rate, trainer.global_step, steps_per_epoch, configured,
                             trainer.current_epoch)
        if trainer.world_size > 1:  # each rank's clock differs: rank 0's plan is everyone's
            epochs = int(trainer.strategy.broadcast(epochs, src=0))
        self.plan = {"budget_minutes": self.budget_s / 60, "rate_steps_per_s": round(rate, 3),
                     "configured_epochs": configured, "planned_epochs": epochs,
                     "planned_steps": epochs * steps_per_epoch, "decided_at_step": trainer.global_step}
        if epochs == configured:
            log.info("time budget %s: at %.2f steps/s all %d epochs fit", _duration(self.budget_s), rate, configured)
            return
        self._apply(trainer, epochs)
        warmup = min((shape.warmup_steps for shape in lr_shapes(trainer)), default=0)
        late = (f" (after the {warmup}-step warm-up: the LR decay so far was planned for {configured} epochs)"
                if trainer.global_step >= warmup else "")
        # The plan is what the budget is for (info); a decision after the warm-up is a warning.
        say = log.warning if late else log.info
        say("time budget %s: at %.2f steps/s here, %d of the configured %d epochs fit (%d steps); the learning "
            "rate now decays over them%s. To repeat this run exactly on any machine: trainer.max_epochs=%d "
            "trainer.budget_minutes=null", _duration(self.budget_s), rate, epochs, configured,
            epochs * steps_per_epoch, late, epochs)

    def _apply(self, trainer: "pl.Trainer", epochs: int) -> None:
        trainer.fit_loop.max_epochs = epochs
        total = max(int(trainer.estimated_stepping_batches), 1)
        for shape in lr_shapes(trainer):
            shape.total = total
