"""DDIM sampling and deterministic inversion (Song et al. 2021, "Denoising Diffusion
Implicit Models").

One step from t to the previous timestep t' of the array (DDIM eq. 12, a = alpha_bar):

    x_t' = sqrt(a_t') x0_hat + sqrt(1 - a_t' - sigma^2) eps_hat + sigma z

with ``sigma = eta * sqrt((1 - a_t') / (1 - a_t)) * sqrt(1 - a_t / a_t')`` (DDIM eq. 16):
eta = 0 is the deterministic DDIM sampler, eta = 1 matches DDPM's posterior variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..denoiser import Denoiser
from ..schedule import NoiseSchedule
from .base import Sampler, check_spacing, check_steps, timesteps


@dataclass
class DDIMSampler(Sampler):
    """DDIM sampler on ``steps`` timesteps chosen by ``spacing``.

    With ``clip_denoised`` the predicted x_0 is clipped to [-1, 1] and eps is recomputed
    from the clipped x_0, so both terms of eq. 12 describe the same x_0.
    """

    steps: int = 50
    eta: float = 0.0
    spacing: str = "leading"
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        check_steps(self.steps)
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta!r}")
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
        eps, x0 = denoiser.predict(x, t, cond)
        if self.clip_denoised and denoiser.clips:
            x0 = denoiser.clip(x0)
            eps = (x - math.sqrt(alpha_bar_t) * x0) / math.sqrt(1.0 - alpha_bar_t)
        # DDIM eq. 16; zero on the last step, where alpha_bar_prev = 1.
        sigma = self.eta * math.sqrt(
            (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev)
        )
        direction = math.sqrt(max(1.0 - alpha_bar_prev - sigma**2, 0.0))
        x_prev = math.sqrt(alpha_bar_prev) * x0 + direction * eps  # DDIM eq. 12
        if sigma > 0.0 and not last:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_prev = x_prev + sigma * noise
        return x_prev


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    steps: int,
    cond: Any = None,
    spacing: str = "leading",
) -> torch.Tensor:
    """Run the deterministic DDIM update (eta = 0) upwards: data ``x0`` -> latent x_T.

    Walks the same timestep array as ``DDIMSampler(steps, eta=0, spacing=spacing)`` in
    ascending order, starting from alpha_bar = 1. Since eps at the next (noisier) point is
    not known yet, each step uses eps predicted at the current point with the next
    timestep, the usual first-order approximation of reversing the DDIM ODE
    (Song et al. 2021, sec. 4.3 / 5.4). Sampling the result with that DDIM sampler
    approximately reconstructs ``x0``.
    """
    ts = timesteps(schedule.num_timesteps, steps, spacing).flip(0).tolist()
    alpha_bars = schedule.alpha_bar_at(torch.tensor(ts)).double().tolist()
    x = x0.to(schedule.device)
    alpha_bar_cur = 1.0
    for t, alpha_bar_next in zip(ts, alpha_bars):
        eps = denoiser.eps(x, t, cond)
        x0_hat = (x - math.sqrt(1.0 - alpha_bar_cur) * eps) / math.sqrt(alpha_bar_cur)
        x = math.sqrt(alpha_bar_next) * x0_hat + math.sqrt(1.0 - alpha_bar_next) * eps
        alpha_bar_cur = alpha_bar_next
    return x
