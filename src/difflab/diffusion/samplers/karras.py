"""Euler and Heun samplers in sigma space (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", EDM), and the loop every sigma sampler shares.

The probability-flow ODE of the variance-exploding variable x_sigma (see ``..sigma``) is
``dx/dsigma = (x - D(x; sigma)) / sigma`` (EDM eq. 1 with s(t) = 1, sigma(t) = t, written
with eq. 3's D). Both samplers walk the rho-schedule of EDM eq. 5 from the schedule's
sigma_max to its sigma_min, then to 0. ``EulerSampler`` takes first-order steps (EDM
Alg. 1 without the correction); ``HeunSampler`` is EDM Alg. 1 (2nd order, with the
Euler step onto sigma = 0 at the end, so N steps cost 2N - 1 network calls). With
``s_churn > 0`` both add EDM Alg. 2's churn: before each step whose sigma lies in
[s_tmin, s_tmax], noise raises sigma to ``sigma_hat = (1 + gamma) sigma`` with
``gamma = min(s_churn / N, sqrt(2) - 1)``.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..denoiser import Denoiser
from ..schedule import NoiseSchedule
from ..sigma import SigmaDenoiser, karras_sigmas, sigma_range, sigma_to_t
from .base import Sampler, _track, check_steps


def check_number(name: str, value: Any, allowed: str, ok: bool) -> None:
    """Raise ValueError naming the setting unless ``value`` is a real number and ``ok``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_sigma_overrides(sigma_min: float | None, sigma_max: float | None) -> None:
    """Optional noise-level overrides: each None or a finite number > 0, min <= max."""
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None:
            check_number(name, value, "None or a number > 0", value > 0 and math.isfinite(value))
    if sigma_min is not None and sigma_max is not None and sigma_min > sigma_max:
        raise ValueError(f"sigma_min must be <= sigma_max, got {sigma_min!r} > {sigma_max!r}")


EDM_SIGMA_MAX = 80.0  # Karras et al. 2022, sec. 5: where every sigma-space sampler starts by default


def resolve_sigma_range(
    schedule: NoiseSchedule, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    """The (sigma_min, sigma_max) a sigma-space sampler integrates over: the given overrides, else
    the schedule's smallest sigma and EDM's 80 (the schedule's largest where that is lower).

    The one place this default lives: a schedule whose last betas are clipped (cosine: sigma(T-1)
    ~ 2e4) would otherwise spend its first steps where nothing happens (Heun-18 on a Gaussian
    mixture: covariance error 0.47 from 2e4, 0.05 from 80; ``closed_form_table``). Pass the
    schedule's own ``sigma_range(schedule)[1]`` as sigma_max to start there instead.
    """
    lo, hi = sigma_range(schedule)
    lo = lo if sigma_min is None else sigma_min
    hi = min(hi, EDM_SIGMA_MAX) if sigma_max is None else sigma_max
    if lo > hi:
        raise ValueError(f"sigma_min ({lo}) must be <= sigma_max ({hi}) on this schedule")
    return lo, hi


class SigmaSampler(Sampler):
    """Base class of samplers that integrate in sigma space with a ``SigmaDenoiser``.

    Subclasses give the descending noise levels (``sigmas_for``, ending with 0) and one
    step from ``sigmas[i]`` to ``sigmas[i + 1]`` (``sigma_step``); ``sample`` runs the loop
    under the same contract as the discrete-time samplers. ``x_T`` (or fresh noise) is
    unit-variance noise, scaled by ``initial_scale(sigmas[0])``; the result is in the data
    scale (x at sigma = 0). The trajectory holds ``x_sigma / sqrt(1 + sigma^2)`` after each
    step, i.e. the VP variable x_t that the DDPM/DDIM trajectories hold.
    """

    clip_denoised: bool = False

    @abc.abstractmethod
    def sigmas_for(self, schedule: NoiseSchedule) -> torch.Tensor:
        """Descending float64 noise levels on CPU, the last one 0."""

    @abc.abstractmethod
    def sigma_step(
        self,
        denoise: SigmaDenoiser,
        x: torch.Tensor,
        sigmas: list[float],
        i: int,
        *,
        cond: Any,
        generator: torch.Generator | None,
        state: dict[str, Any],
    ) -> torch.Tensor:
        """Map x at ``sigmas[i]`` to ``sigmas[i + 1]``; ``state`` lives for one ``sample`` call."""

    def timesteps_for(self, schedule: NoiseSchedule) -> torch.Tensor:
        """The (fractional, float64) timesteps of the noise levels stepped from."""
        return sigma_to_t(schedule, self.sigmas_for(schedule)[:-1])

    def initial_scale(self, sigma_max: float) -> float:
        """Std of x at the first noise level: sigma_max (EDM Alg. 1, line 1)."""
        return sigma_max

    def step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} steps in sigma, not over integer timesteps: use sample() or sigma_step()"
        )

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        shape: Sequence[int] | None = None,
        *,
        x_T: torch.Tensor | None = None,
        cond: Any = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Integrate from sigmas[0] down to 0; see ``Sampler.sample`` for the arguments."""
        if (shape is None) == (x_T is None):
            raise ValueError("give exactly one of `shape` and `x_T`")
        device = schedule.device
        sigmas = self.sigmas_for(schedule).tolist()
        if x_T is None:
            noise = torch.randn(tuple(shape), generator=generator, device=device)
        else:
            noise = x_T.to(device)
        x = noise * self.initial_scale(sigmas[0])
        denoise = SigmaDenoiser(denoiser)
        state: dict[str, Any] = {}
        trajectory: list[torch.Tensor] = []
        description = f"{type(self).__name__} ({len(sigmas) - 1} steps)"
        for i in _track(range(len(sigmas) - 1), description, progress):
            x = self.sigma_step(denoise, x, sigmas, i, cond=cond, generator=generator, state=state)
            if return_trajectory:
                trajectory.append((x / math.sqrt(1.0 + sigmas[i + 1] ** 2)).detach().cpu())
        return (x, trajectory) if return_trajectory else x


@dataclass
class KarrasSampler(SigmaSampler):
    """Settings shared by the EDM samplers (abstract: use ``EulerSampler``/``HeunSampler``).

    ``steps``: N noise levels, EDM eq. 5 with exponent ``rho`` between ``sigma_min`` and
    ``sigma_max`` (default: the schedule's smallest sigma and EDM's 80, see
    ``resolve_sigma_range``), then 0.
    ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``: EDM Alg. 2's stochasticity (off at
    ``s_churn = 0``; s_tmin/s_tmax bound the sigmas it applies to). ``clip_denoised``
    clamps D to [-1, 1].
    """

    steps: int = 18
    rho: float = 7.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    clip_denoised: bool = False

    def __post_init__(self) -> None:
        check_steps(self.steps)
        check_number("rho", self.rho, "a number > 0", self.rho > 0)
        check_number("s_churn", self.s_churn, "a number >= 0", self.s_churn >= 0)
        check_number("s_tmin", self.s_tmin, "a number >= 0", self.s_tmin >= 0)
        check_number("s_tmax", self.s_tmax, f"a number >= s_tmin ({self.s_tmin})", self.s_tmax >= self.s_tmin)
        check_number("s_noise", self.s_noise, "a number >= 0", self.s_noise >= 0)
        check_sigma_overrides(self.sigma_min, self.sigma_max)

    def sigmas_for(self, schedule: NoiseSchedule) -> torch.Tensor:
        lo, hi = resolve_sigma_range(schedule, self.sigma_min, self.sigma_max)
        return torch.cat([karras_sigmas(self.steps, lo, hi, self.rho), torch.zeros(1, dtype=torch.float64)])

    def churn(
        self, x: torch.Tensor, sigma: float, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, float]:
        """EDM Alg. 2, lines 4-6: raise the noise level to sigma_hat by adding fresh noise."""
        if self.s_churn == 0 or not self.s_tmin <= sigma <= self.s_tmax:
            return x, sigma
        gamma = min(self.s_churn / self.steps, math.sqrt(2.0) - 1.0)
        sigma_hat = sigma * (1.0 + gamma)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + self.s_noise * math.sqrt(sigma_hat**2 - sigma**2) * noise, sigma_hat


@dataclass
class EulerSampler(KarrasSampler):
    """First-order (Euler) steps of the probability-flow ODE on the EDM rho-schedule: EDM
    Alg. 2 without its 2nd-order correction; ``steps`` = N network calls (default 50: first
    order needs more than Heun's 18). Settings: see ``KarrasSampler``.
    """

    steps: int = 50

    def sigma_step(self, denoise, x, sigmas, i, *, cond, generator, state):
        x_hat, sigma_hat = self.churn(x, sigmas[i], generator)
        slope = (x_hat - denoise(x_hat, sigma_hat, cond, self.clip_denoised)) / sigma_hat  # Alg. 2, line 7
        return x_hat + (sigmas[i + 1] - sigma_hat) * slope  # line 8


@dataclass
class HeunSampler(KarrasSampler):
    """EDM Alg. 1 (``s_churn = 0``) / Alg. 2: Heun's 2nd-order method on the rho-schedule.

    Each step is an Euler step corrected by the slope at its end point (Alg. 2, lines
    9-11), except the last one onto sigma = 0, which stays Euler: ``steps`` = N costs
    2N - 1 network calls (EDM's default N = 18, 35 calls). Settings: see ``KarrasSampler``.
    """

    def sigma_step(self, denoise, x, sigmas, i, *, cond, generator, state):
        sigma_next = sigmas[i + 1]
        x_hat, sigma_hat = self.churn(x, sigmas[i], generator)
        slope = (x_hat - denoise(x_hat, sigma_hat, cond, self.clip_denoised)) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * slope
        if sigma_next == 0.0:
            return x_next
        slope_next = (x_next - denoise(x_next, sigma_next, cond, self.clip_denoised)) / sigma_next
        return x_hat + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next)
