"""What a run does when its loss is not finite: stop with the step and the last finite loss
(``nonfinite=stop``, the default), or skip that step's update (``nonfinite=skip``).

Stopping raises before the optimizer step, so the weights, the EMA and every checkpoint written
so far stay as they were: ``last.ckpt`` is the last good state, and resuming from it with a lower
``optim.lr`` (or ``nonfinite=skip``) goes on from there. Skipping returns no loss from the
training step, which Lightning takes as "no backward, no optimizer step"; after ``max_skips`` bad
steps in a row the run stops as with ``stop``, since a model that only produces NaN is not
recovering. The check reads one scalar per step on the host: free on the CPU, a short wait for the
step's kernels on a GPU, and what stopping before the update costs.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger("difflab.train")

POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite (the message names the step and the last finite loss)."""


class NonFiniteGuard:
    """Checks each training loss; see the module doc. ``skipped`` counts the steps skipped."""

    def __init__(self, policy: str = "stop", max_skips: int = 100) -> None:
        if policy not in POLICIES:
            raise ValueError(f"nonfinite={policy!r} is not allowed: expected {' or '.join(POLICIES)}")
        self.policy, self.max_skips = policy, int(max_skips)
        self.skipped, self.in_a_row = 0, 0
        self.last_finite: Optional[torch.Tensor] = None
        self.last_finite_step: Optional[int] = None

    def check(self, loss: torch.Tensor, step: int) -> Optional[torch.Tensor]:
        """``loss`` if it is finite; else None (skip) or NonFiniteLossError (stop)."""
        if bool(torch.isfinite(loss.detach()).all()):
            self.last_finite, self.last_finite_step, self.in_a_row = loss.detach(), step, 0
            return loss
        last = ("no finite loss before it" if self.last_finite is None else
                f"the last finite loss was {float(self.last_finite):.6g} at step {self.last_finite_step}")
        if self.policy == "skip" and self.in_a_row < self.max_skips:
            self.skipped += 1
            self.in_a_row += 1
            log.warning("training loss is %s at step %d; skipping that update (nonfinite=skip; %s)",
                        float(loss.detach()), step, last)
            return None
        why = (f"{self.in_a_row} steps in a row were not finite (nonfinite=skip gives up after max_skips)"
               if self.policy == "skip" else "nonfinite=stop")
        raise NonFiniteLossError(
            f"training loss is {float(loss.detach())} at step {step}; {last}. The run stopped before this "
            f"step's update ({why}), so the weights and every checkpoint written so far are the last good ones. "
            "Lower optim.lr or check the data, then resume with ckpt_path=<run>/checkpoints/last.ckpt; or set "
            "nonfinite=skip to skip such steps.")
