"""DPM-Solver++(2M): the multistep data-prediction solver of Lu et al. 2022, "DPM-Solver++:
Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2.

The probability-flow ODE is solved exactly in its linear part and the data prediction
x_0 is integrated in log-SNR time lambda = log(alpha / sigma_VP) = -log sigma (sigma of
the VE variable x_sigma, see ``..sigma``). In VE variables, with h = lambda_i - lambda_{i-1}
= log(sigma_{i-1} / sigma_i), one step is

    x_i = (sigma_i / sigma_{i-1}) x_{i-1} + (1 - e^{-h}) D_i,

which with D_i = x0_hat(x_{i-1}) is first-order DPM-Solver++ (sec. 4, identical to DDIM)
and with ``D_i = (1 + 1/(2 r)) x0_hat_{i-1} - 1/(2 r) x0_hat_{i-2}``,
``r = h_{i-1} / h_i`` is the multistep DPM-Solver++(2M) of Alg. 2, which reuses the
previous step's prediction: one network call per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule
from ..sigma import karras_sigmas, sigma_to_t
from .base import SPACINGS, check_steps, timesteps
from .karras import SigmaSampler, check_sigma_overrides, resolve_sigma_range

ORDERS = (1, 2)
# The integer-timestep spacings of ``timesteps`` plus two grids of noise levels between the
# schedule's sigma_min and sigma_max: uniform in lambda = -log sigma, and EDM's rho = 7.
DPM_SPACINGS = (*SPACINGS, "logsnr", "karras")


@dataclass
class DPMSolverPPSampler(SigmaSampler):
    """DPM-Solver++ (``order`` 1 or 2, multistep) on ``steps`` noise levels, then sigma = 0:
    ``steps`` network calls.

    ``spacing`` picks the grid. ``"leading"``, ``"trailing"``, ``"linspace"``: the integer
    array ``timesteps(T, steps, spacing)`` that DDIM walks, at its exact table noise levels
    (the network gets integer timesteps). ``"logsnr"`` (default): uniform in lambda between
    the schedule's sigma_max and sigma_min (the "logSNR" time steps of the DPM-Solver
    papers), where every r = 1; ``"karras"``: EDM eq. 5 with rho = 7. These two give the
    network fractional timesteps (``sigma.sigma_to_t``) and take optional ``sigma_min`` /
    ``sigma_max`` overrides of the schedule's range (on the cosine schedule, whose sigma(T-1)
    is ~2e4, ``sigma_max = 80`` is much better). Time-uniform arrays put one large lambda
    step at the low-noise end of a linear schedule, where the 2M extrapolation with a small
    r then costs accuracy (see ``closed_form_table``).

    ``x_T`` is N(0, I) noise in the VP variable at the first level (x_sigma = x_T sqrt(1 +
    sigma^2)), as for DDIM, so ``order=1`` on an integer array reproduces deterministic
    DDIM (eta = 0) step for step.

    The first step has no history and is first order (Alg. 2, line 3). The last step lands
    on sigma = 0, lambda = +inf, where the 2nd-order correction 1/(2r) (m0 - m1) with
    r = h_{i-1} / h_i -> 0 diverges: it is first order, which there means returning
    x0_hat (what diffusers' ``final_sigmas_type="zero"`` and k-diffusion do).
    ``lower_order_final`` names that choice for parity with the DPM-Solver code and diffusers;
    since every grid here ends at sigma = 0 it cannot be turned off (False raises).
    ``clip_denoised`` clamps each x0_hat to [-1, 1] (static thresholding).
    """

    steps: int = 20
    order: int = 2
    lower_order_final: bool = True
    spacing: str = "logsnr"
    sigma_min: float | None = None
    sigma_max: float | None = None
    clip_denoised: bool = False

    def __post_init__(self) -> None:
        check_steps(self.steps)
        if self.order not in ORDERS or isinstance(self.order, bool):
            raise ValueError(f"order must be one of {', '.join(map(str, ORDERS))}, got {self.order!r}")
        if self.lower_order_final is not True:
            raise ValueError(
                f"lower_order_final must be True, got {self.lower_order_final!r}: the final step lands on "
                "sigma = 0 (lambda = inf), where only the first-order update is defined"
            )
        if self.spacing not in DPM_SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; allowed spacings: {', '.join(DPM_SPACINGS)}")
        check_sigma_overrides(self.sigma_min, self.sigma_max)
        if self.spacing in SPACINGS and (self.sigma_min, self.sigma_max) != (None, None):
            raise ValueError(
                f"sigma_min/sigma_max apply to the logsnr and karras grids only, not to spacing {self.spacing!r}"
            )

    def timesteps_for(self, schedule: NoiseSchedule) -> torch.Tensor:
        """LongTensor for the integer spacings, float64 fractional timesteps otherwise."""
        if self.spacing in SPACINGS:
            return timesteps(schedule.num_timesteps, self.steps, self.spacing)
        return sigma_to_t(schedule, self.sigmas_for(schedule)[:-1])

    def sigmas_for(self, schedule: NoiseSchedule) -> torch.Tensor:
        if self.spacing in SPACINGS:
            sigmas = schedule.sigmas.detach().to("cpu", torch.float64)[self.timesteps_for(schedule)]
        else:
            lo, hi = resolve_sigma_range(schedule, self.sigma_min, self.sigma_max)
            if self.spacing == "karras":
                sigmas = karras_sigmas(self.steps, lo, hi)
            else:
                sigmas = torch.linspace(math.log(hi), math.log(lo), self.steps, dtype=torch.float64).exp()
                sigmas[0] = hi  # exactly, so the table's ends map to whole timesteps
                if self.steps > 1:
                    sigmas[-1] = lo
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def initial_scale(self, sigma_max: float) -> float:
        """x_sigma = x_t / sqrt(alpha_bar) = x_t sqrt(1 + sigma^2) for x_t ~ N(0, I)."""
        return math.sqrt(1.0 + sigma_max**2)

    def sigma_step(self, denoise, x, sigmas, i, *, cond, generator, state):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, cond, self.clip_denoised)
        if sigma_next == 0.0:
            return x0  # first-order step onto lambda = inf: x = x0_hat
        h = math.log(sigma / sigma_next)
        previous = state.get("previous")  # (x0_hat, h) of the step before
        state["previous"] = (x0, h)
        if self.order == 2 and previous is not None:
            x0_prev, h_prev = previous
            half_over_r = 0.5 * h / h_prev  # 1 / (2 r), r = h_{i-1} / h_i
            x0 = (1.0 + half_over_r) * x0 - half_over_r * x0_prev
        return (sigma_next / sigma) * x - math.expm1(-h) * x0
