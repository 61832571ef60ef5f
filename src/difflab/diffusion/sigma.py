"""The sigma-space (VE / EDM) view of a discrete-time VP model.

A model trained on T discrete steps sees ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``
(a = alpha_bar). Dividing by ``sqrt(a_t)`` gives the variance-exploding variable

    x_sigma = x_t / sqrt(a_t) = x_0 + sigma_t eps,   sigma_t = sqrt((1 - a_t) / a_t),

so the same network defines a denoiser ``D(x_sigma, sigma) ~ E[x_0 | x_sigma]`` for the
probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` of Karras et al. 2022 (EDM,
eq. 1 with s(t) = 1 and sigma(t) = t). This is EDM's "VP" preconditioning (Table 1): the
network input is ``c_in x_sigma`` with ``c_in = 1 / sqrt(1 + sigma^2)`` (that is x_t again)
and the time input is the timestep whose noise level is sigma. Noise levels between the
entries of the discrete table map to fractional timesteps by linear interpolation of log
sigma over the table (the U-Net takes float t); levels outside the table are clamped to
its ends for the time input only, while c_in and the output conversion use the true sigma.

On the continuous paths (``flow``, ``edm``) the same holds with the path's own input scale and
output preconditioning (``parameterization``), and sigma maps to its exact fractional index.

``karras_sigmas`` is the rho-schedule of EDM eq. 5, and ``sigma_range`` the span of noise
levels a schedule was trained on.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .denoiser import Denoiser
from .parameterization import coefficients
from .schedule import NoiseSchedule

__all__ = [
    "SigmaDenoiser",
    "karras_sigmas",
    "sigma_range",
    "sigma_to_t",
    "t_to_sigma",
]


def _log_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """log sigma_t for t = 0 .. T-1 (float64, CPU, strictly increasing in t)."""
    return schedule.sigmas.detach().to("cpu", torch.float64).log()


def sigma_range(schedule: NoiseSchedule) -> tuple[float, float]:
    """(sigma_min, sigma_max): the noise levels of timesteps 0 and T-1 of ``schedule``."""
    sigmas = schedule.sigmas.detach().to("cpu", torch.float64)
    return sigmas[0].item(), sigmas[-1].item()


def sigma_to_t(schedule: NoiseSchedule, sigma: torch.Tensor | float) -> torch.Tensor:
    """Fractional timestep(s) whose noise level is ``sigma``: log sigma interpolated linearly
    over the discrete table, clamped to [0, T-1]. Returns float64 on CPU, ``sigma``'s shape.

    Exactly the inverse of ``t_to_sigma`` inside the table; a table entry maps to its
    integer timestep.
    """
    if schedule.continuous:  # exact; a level stored in the float32 table lands on its whole index
        index = schedule.continuous_index(torch.as_tensor(sigma, dtype=torch.float64).detach().cpu())
        whole = index.round()
        return torch.where((index - whole).abs() < 1e-4, whole, index)
    log_table = _log_sigmas(schedule)
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().clamp(min=1e-300).log()
    if log_table.numel() == 1:
        return torch.zeros_like(log_sigma)
    clamped = log_sigma.clamp(log_table[0], log_table[-1])
    # hi is the first entry >= log sigma (at least 1), lo the one before it.
    hi = torch.searchsorted(log_table, clamped).clamp(1, log_table.numel() - 1)
    lo = hi - 1
    w = (clamped - log_table[lo]) / (log_table[hi] - log_table[lo])
    return lo.to(torch.float64) + w


def t_to_sigma(schedule: NoiseSchedule, t: torch.Tensor | float) -> torch.Tensor:
    """Noise level(s) at (fractional) timestep(s) ``t``: log sigma interpolated linearly
    between the neighbouring table entries; integer ``t`` gives the table value exactly.
    Returns float64 on CPU, ``t``'s shape; ``t`` is clamped to [0, T-1]."""
    log_table = _log_sigmas(schedule)
    t = torch.as_tensor(t).detach().cpu().to(torch.float64).clamp(0, log_table.numel() - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=log_table.numel() - 1)
    w = t - lo.to(torch.float64)
    interpolated = ((1 - w) * log_table[lo] + w * log_table[hi]).exp()
    if schedule.continuous:  # the path's own level between table entries, not an interpolation
        interpolated = schedule.continuous_sigma(t)
    # exp(log(.)) is not exact: hand back the table value itself at whole timesteps.
    table = schedule.sigmas.detach().to("cpu", torch.float64)
    return torch.where(w == 0, table[lo], interpolated)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The ``n`` noise levels of Karras et al. 2022, eq. 5 (i = 0 .. n-1), descending:

        sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    Float64, with the end points exactly sigma_max and sigma_min (no round-off through the
    rho-th root). Samplers append the final sigma_n = 0 themselves. ``n = 1`` gives [sigma_max].
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0] = sigma_max
    if n > 1:
        sigmas[-1] = sigma_min
    return sigmas


class SigmaDenoiser:
    """``D(x_sigma, sigma, cond) ~ E[x_0]`` for a discrete-time ``Denoiser`` (any objective).

    ``sigma`` is a python float (one level for the whole batch) or a tensor of shape [] or
    [B]. The network is called once, on ``x_sigma / sqrt(1 + sigma^2)`` at the timestep
    ``sigma_to_t(sigma)``; when every timestep is a whole number (a discrete-grid sampler
    such as DPM-Solver++ on ``timesteps()``) it is passed as a LongTensor exactly as
    DDPM/DDIM pass it, otherwise as float. ``clip`` clamps the result to the data range
    (``Denoiser.clip_range``).
    """

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.schedule = denoiser.schedule

    def __repr__(self) -> str:
        return f"SigmaDenoiser({self.denoiser!r})"

    @property
    def sigma_min(self) -> float:
        return sigma_range(self.schedule)[0]

    @property
    def sigma_max(self) -> float:
        return sigma_range(self.schedule)[1]

    def timestep(self, sigma: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        """The network's time input for noise level(s) ``sigma``: shape [batch] on ``device``."""
        t = sigma_to_t(self.schedule, sigma)
        rounded = t.round()
        if bool((t == rounded).all()):
            t = rounded.long()
        else:
            t = t.to(torch.float32)
        return t.to(device).expand(batch) if t.ndim == 0 else t.to(device)

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any = None, clip: bool = False
    ) -> torch.Tensor:
        if isinstance(sigma, torch.Tensor) and sigma.numel() > 1:
            level = sigma.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        else:
            level = float(sigma)
        # EDM Table 1: on the VP path the network sees x_t = c_in x_sigma, c_in = 1 / sqrt(1 + sigma^2).
        c_in, c_skip, c_out = coefficients(self.schedule, self.denoiser.objective, level)
        out = self.denoiser.net(x * c_in, self.timestep(sigma, x.shape[0], x.device), cond)
        x0 = (c_skip * x + c_out * out.to(x.dtype)).to(x.dtype)
        return self.denoiser.clip(x0, clip)
