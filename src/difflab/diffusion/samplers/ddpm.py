"""Ancestral sampling (Ho et al. 2020, Algorithm 2), optionally on a respaced sub-sequence.

Each step draws x_{t'} ~ N(mu-tilde(x_t, x0_hat), var) with the posterior mean of DDPM
eq. 7 evaluated at the predicted x_0. On a sub-sequence t > t' of the timestep array the
schedule is respaced: beta = 1 - alpha_bar_t / alpha_bar_t' (Nichol & Dhariwal 2021,
sec. 4), which for the full sequence gives back the original betas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..denoiser import Denoiser
from ..schedule import NoiseSchedule
from .base import Sampler, check_spacing, check_steps, timesteps

VARIANCES = ("posterior", "beta")


@dataclass
class DDPMSampler(Sampler):
    """DDPM ancestral sampler.

    ``steps``: number of steps, ``None`` for all T. ``variance``: ``"posterior"`` uses
    beta-tilde_t (DDPM eq. 7, "fixedsmall"); ``"beta"`` uses beta_t ("fixedlarge"), where
    the posterior variance Ho et al. put at t = 0 never matters because the last step
    adds no noise. ``clip_denoised`` clips the predicted x_0 to [-1, 1].
    """

    steps: int | None = None
    variance: str = "posterior"
    clip_denoised: bool = True
    spacing: str = "leading"

    def __post_init__(self) -> None:
        if self.steps is not None:
            check_steps(self.steps)
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; allowed variances: {', '.join(VARIANCES)}")
        check_spacing(self.spacing)

    def timesteps_for(self, schedule: NoiseSchedule) -> torch.Tensor:
        steps = schedule.num_timesteps if self.steps is None else self.steps
        return timesteps(schedule.num_timesteps, steps, self.spacing)

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
        x0 = denoiser.x0(x, t, cond, clip=self.clip_denoised)
        beta = 1.0 - alpha_bar_t / alpha_bar_prev  # respaced beta_t
        # DDPM eq. 7: mu-tilde = coef_x0 * x_0 + coef_xt * x_t.
        coef_x0 = math.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar_t)
        coef_xt = math.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
        mean = coef_x0 * x0 + coef_xt * x
        if last:
            return mean
        if self.variance == "posterior":
            variance = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
        else:
            variance = beta
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + math.sqrt(variance) * noise
