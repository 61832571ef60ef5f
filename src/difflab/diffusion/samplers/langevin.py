"""Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", Alg. 1, and Alg. 3 for the VP SDE).

Each step first moves x from timestep t to the previous timestep t' of the array with a
predictor, then runs ``corrector_steps`` Langevin MCMC steps that target q_t' (the
corrector of Alg. 5, VP case). The score comes from the eps prediction,
``score = -eps / sqrt(1 - alpha_bar_t)`` (``process.score_from_eps``). With respaced
steps, beta = 1 - alpha_bar_t / alpha_bar_t' plays the role of beta_t.

Predictors (z ~ N(0, I), no noise on the last step, which lands on alpha_bar = 1):

- ``"reverse_diffusion"``, the paper's reverse-diffusion sampler for the VP SDE (Alg. 3):
  ``x' = (2 - sqrt(1 - beta)) x + beta score + sqrt(beta) z``
- ``"ancestral"``, the paper's ancestral sampling for VP, i.e. DDPM (Ho et al. 2020, Alg. 2)
  with variance beta: ``x' = (x + beta score) / sqrt(1 - beta) + sqrt(beta) z``

Corrector step (Alg. 5): with g = score(x, t'), step size
``eps = 2 alpha_t' (snr ||z|| / ||g||)^2`` and ``x <- x + eps g + sqrt(2 eps) z``, where
alpha_t' = 1 - beta_t' of the schedule and the norms are per-sample L2 norms averaged over
the batch, as in the authors' released code (so the step size is one number per batch).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ..denoiser import Denoiser
from ..process import score_from_eps
from ..schedule import NoiseSchedule
from .base import Sampler, check_spacing, check_steps, timesteps
from .karras import check_number

PREDICTORS = ("reverse_diffusion", "ancestral")


def _score(denoiser: Denoiser, x: torch.Tensor, t: int, cond: Any) -> torch.Tensor:
    tb = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return score_from_eps(denoiser.schedule, x, tb, denoiser.eps(x, tb, cond)).to(x.dtype)


def _batch_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm averaged over the batch."""
    return v.reshape(v.shape[0], -1).norm(dim=-1).mean()


@torch.no_grad()
def langevin_correct(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: int,
    *,
    snr: float = 0.16,
    steps: int = 1,
    cond: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``steps`` Langevin corrector steps targeting q_t at integer timestep ``t``
    (Song et al. 2021, Alg. 5, with the signal-to-noise step rule of ``snr``). Where the
    score is zero for the whole batch the step size is undefined and x is left unchanged."""
    check_number("snr", snr, "a number > 0", snr > 0)
    alpha = denoiser.schedule.alphas[t].item()
    for _ in range(steps):
        grad = _score(denoiser, x, t, cond)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        grad_norm = _batch_norm(grad)
        step_size = 2.0 * alpha * (snr * _batch_norm(noise) / grad_norm) ** 2
        # A zero score (e.g. an untrained network whose output layer starts at zero) has no
        # step size under this rule: leave x alone instead of taking an infinite step.
        step_size = torch.where(grad_norm > 0, step_size, torch.zeros_like(step_size))
        x = x + step_size * grad + (2.0 * step_size).sqrt() * noise
    return x


@dataclass
class PCSampler(Sampler):
    """Predictor-corrector sampler on ``steps`` timesteps chosen by ``spacing``.

    ``predictor``: ``"reverse_diffusion"`` or ``"ancestral"``; ``corrector_steps``
    Langevin steps (0: predictor only) at signal-to-noise ratio ``snr`` after every step
    but the last. Network calls: steps + corrector_steps * (steps - 1). Song et al. use
    1000 steps, one corrector step and snr = 0.16 for VP models.
    """

    steps: int = 1000
    corrector_steps: int = 1
    snr: float = 0.16
    predictor: str = "reverse_diffusion"
    spacing: str = "leading"

    def __post_init__(self) -> None:
        check_steps(self.steps)
        steps_ok = isinstance(self.corrector_steps, numbers.Integral) and not isinstance(self.corrector_steps, bool)
        if not steps_ok or self.corrector_steps < 0:
            raise ValueError(f"corrector_steps must be an integer >= 0, got {self.corrector_steps!r}")
        check_number("snr", self.snr, "a number > 0", self.snr > 0)
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.predictor!r}; allowed predictors: {', '.join(PREDICTORS)}")
        check_spacing(self.spacing)

    def timesteps_for(self, schedule: NoiseSchedule) -> torch.Tensor:
        return timesteps(schedule.num_timesteps, self.steps, self.spacing)

    def step(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        t: int,
        alpha_bar_t: float,
        alpha_bar_prev: float,
        *,
        last: bool,
        cond: Any = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The predictor alone, from t to the previous timestep of the array."""
        beta = 1.0 - alpha_bar_t / alpha_bar_prev
        score = _score(denoiser, x, t, cond)
        if self.predictor == "reverse_diffusion":
            x = (2.0 - math.sqrt(1.0 - beta)) * x + beta * score
        else:
            x = (x + beta * score) / math.sqrt(1.0 - beta)
        if last:
            return x
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + math.sqrt(beta) * noise

    def after_step(self, denoiser: Denoiser, x: torch.Tensor, t: int, *, cond: Any = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Alg. 1's corrector: Langevin steps at the timestep the predictor just reached."""
        if not self.corrector_steps:
            return x
        return langevin_correct(denoiser, x, t, snr=self.snr, steps=self.corrector_steps, cond=cond,
                                generator=generator)


LangevinSampler = PCSampler  # the name used in the score-SDE literature for the same sampler
