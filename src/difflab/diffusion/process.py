"""The forward process q(x_t | x_0) and conversions between prediction targets.

With ``a = alpha_bar_t``: ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps`` (Ho et al. 2020, eq. 4),
and the velocity ``v = sqrt(a) eps - sqrt(1 - a) x_0`` (Salimans & Ho 2022, sec. 4).
Any one of eps, x_0, v determines the other two given x_t. All functions take the
schedule first and integer timesteps ``t`` as a LongTensor of shape ``[B]``.
"""

from __future__ import annotations

import torch

from .schedule import NoiseSchedule, extract

__all__ = [
    "extract",
    "q_sample",
    "predict_x0_from_eps",
    "predict_eps_from_x0",
    "v_from_x0_eps",
    "predict_x0_from_v",
    "predict_eps_from_v",
    "score_from_eps",
    "q_posterior",
]


def _coefs(
    schedule: NoiseSchedule, t: torch.Tensor, ndim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) shaped to broadcast over ``ndim`` dims."""
    return (
        extract(schedule.sqrt_alpha_bar, t, ndim),
        extract(schedule.sqrt_one_minus_alpha_bar, t, ndim),
    )


def q_sample(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0): ``sqrt(a) x_0 + sqrt(1 - a) noise`` (DDPM eq. 4)."""
    sqrt_a, sqrt_1ma = _coefs(schedule, t, x0.ndim)
    return sqrt_a * x0 + sqrt_1ma * noise


def predict_x0_from_eps(
    schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a): DDPM eq. 4 solved for x_0 (DDIM eq. 9)."""
    sqrt_a, sqrt_1ma = _coefs(schedule, t, xt.ndim)
    return (xt - sqrt_1ma * eps) / sqrt_a


def predict_eps_from_x0(
    schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """eps = (x_t - sqrt(a) x_0) / sqrt(1 - a): DDPM eq. 4 solved for eps."""
    sqrt_a, sqrt_1ma = _coefs(schedule, t, xt.ndim)
    return (xt - sqrt_a * x0) / sqrt_1ma


def v_from_x0_eps(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022, sec. 4)."""
    sqrt_a, sqrt_1ma = _coefs(schedule, t, x0.ndim)
    return sqrt_a * eps - sqrt_1ma * x0


def predict_x0_from_v(
    schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """x_0 = sqrt(a) x_t - sqrt(1 - a) v (Salimans & Ho 2022, sec. 4)."""
    sqrt_a, sqrt_1ma = _coefs(schedule, t, xt.ndim)
    return sqrt_a * xt - sqrt_1ma * v


def predict_eps_from_v(
    schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """eps = sqrt(1 - a) x_t + sqrt(a) v (Salimans & Ho 2022, sec. 4)."""
    sqrt_a, sqrt_1ma = _coefs(schedule, t, xt.ndim)
    return sqrt_1ma * xt + sqrt_a * v


def score_from_eps(
    schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """Score grad_x log q_t(x_t) = -eps / sqrt(1 - a) (Song et al. 2021, score-based SDEs, VP case)."""
    _, sqrt_1ma = _coefs(schedule, t, xt.ndim)
    return -eps / sqrt_1ma


def q_posterior(
    schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7).

    ``mean = coef_x0 * x_0 + coef_xt * x_t`` with ``coef_x0 = sqrt(a_{t-1}) beta_t / (1 - a_t)``,
    ``coef_xt = sqrt(alpha_t) (1 - a_{t-1}) / (1 - a_t)``; variance is beta-tilde_t.
    """
    ndim = xt.ndim
    coef_x0 = extract(schedule.posterior_mean_coef_x0, t, ndim)
    coef_xt = extract(schedule.posterior_mean_coef_xt, t, ndim)
    mean = coef_x0 * x0 + coef_xt * xt
    variance = extract(schedule.posterior_variance, t, ndim)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, ndim)
    return mean, variance, log_variance
