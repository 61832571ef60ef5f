"""Where training spends its noise levels: densities over sigma, on any path.

Each density maps uniform draws ``u`` in (0, 1) to VE noise levels sigma by its inverse CDF, so
``stratified=True`` (one draw in each of B equal bins of (0, 1), shuffled; Kingma et al. 2021,
"Variational diffusion models", low-discrepancy sampler) applies to all of them:

- ``Uniform``: uniform over the path's time: the T discrete timesteps of a VP schedule (DDPM),
  t between the table's ends (0.002 .. 0.988 for sigma 0.002 .. 80) on the flow path (rectified
  flow's U(0, 1), without the ends no sampler visits), log sigma on the edm path (Song et al.'s VE).
- ``LogNormal(p_mean, p_std)``: ``log sigma ~ N(p_mean, p_std)`` (EDM, Karras et al. 2022, sec. 5:
  -1.2, 1.2). In VP terms log SNR = -2 log sigma ~ N(-2 p_mean, 2 p_std).
- ``LogitNormal(mean, std)``: ``t = sigmoid(N(mean, std))`` in the path's time (Esser et al. 2024,
  SD3, sec. 3.1). On the flow path sigma = t / (1 - t), so ``log sigma = logit t``: it *is*
  ``LogNormal(mean, std)`` there (tested by a Kolmogorov-Smirnov test).
- ``Last``: only the noisiest level (SR3's regression baseline, with objective x0).

``timesteps(schedule, batch)`` returns the network's time input: long indices of the table on a
VP schedule (sigma snapped to the nearest level, in log sigma), fractional indices on a
continuous path (sigma clamped to the path's range), and the sigma of each.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .schedule import NoiseSchedule

__all__ = ["DENSITIES", "Density", "Last", "LogNormal", "LogitNormal", "Uniform", "levels_of", "nearest_level"]


class Density:
    """Base: a noise-level density given by its inverse CDF (``sigma_of``)."""

    name = "density"

    def __init__(self, stratified: bool = False) -> None:
        self.stratified = bool(stratified)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def uniforms(self, batch: int, device: torch.device | str | None = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``batch`` draws in (0, 1), float64: i.i.d., or one per bin of width 1/batch, shuffled."""
        u = torch.rand(batch, device=device, generator=generator, dtype=torch.float64)
        if self.stratified:
            order = torch.randperm(batch, device=device, generator=generator)
            u = (order.to(torch.float64) + u) / batch
        return u.clamp(1e-12, 1 - 1e-12)

    def sigma_of(self, u: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def sigmas(self, schedule: NoiseSchedule, batch: int, device: torch.device | str | None = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Raw VE levels [batch] (float64) drawn from the density, before any snapping or clamping."""
        return self.sigma_of(self.uniforms(batch, device, generator), schedule)

    def timesteps(self, schedule: NoiseSchedule, batch: int, device: torch.device | str | None = None,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the network's time input [batch], the VE level of each [batch], float32)."""
        return levels_of(schedule, self.sigmas(schedule, batch, device, generator))


def levels_of(schedule: NoiseSchedule, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Time inputs and levels for raw ``sigma``: the nearest table entry in log sigma on a VP
    schedule (long), the exact fractional index with sigma clamped to the range on a continuous one."""
    if schedule.continuous:
        sigma = sigma.clamp(schedule.sigma_min, schedule.sigma_max)
        return schedule.continuous_index(sigma).to(torch.float32), sigma.to(torch.float32)
    t = nearest_level(schedule, sigma)
    return t, schedule.sigmas.to(sigma.device)[t]


def nearest_level(schedule: NoiseSchedule, sigma: torch.Tensor) -> torch.Tensor:
    """The index (long) of the table level nearest to each ``sigma``, in log sigma, on any path."""
    table = schedule.sigmas.to(sigma.device)
    if table.numel() == 1:
        return torch.zeros(sigma.shape, dtype=torch.long, device=sigma.device)
    log_table = table.double().log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-300).log()
    right = torch.searchsorted(log_table, log_sigma).clamp(1, table.numel() - 1)
    left = right - 1
    nearer_left = (log_table[right] - log_sigma).abs() > (log_table[left] - log_sigma).abs()
    return torch.where(nearer_left, left, right)


def _normal_icdf(u: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


class Uniform(Density):
    """Uniform over the path's time (see the module doc)."""

    name = "uniform"

    def sigma_of(self, u: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        if schedule.continuous:  # t uniform over the table's range of t (flow) or log sigma (edm)
            return schedule.continuous_sigma(u * (schedule.num_timesteps - 1))
        index = (u * schedule.num_timesteps).floor().clamp(max=schedule.num_timesteps - 1).long()
        return schedule.sigmas.to(u.device).double()[index]

    def timesteps(self, schedule: NoiseSchedule, batch: int, device: torch.device | str | None = None,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if schedule.continuous or self.stratified:
            return super().timesteps(schedule, batch, device, generator)
        # DDPM's t ~ U{0..T-1}, drawn exactly as before the densities existed (same seeds, same t).
        t = torch.randint(0, schedule.num_timesteps, (batch,), device=device, generator=generator)
        return t, schedule.sigmas.to(t.device)[t]


class LogNormal(Density):
    """``log sigma ~ N(p_mean, p_std)`` (EDM's training density)."""

    name = "lognormal"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, stratified: bool = False) -> None:
        super().__init__(stratified)
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sigma_of(self, u: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        return (self.p_mean + self.p_std * _normal_icdf(u)).exp()


class LogitNormal(Density):
    """``t = sigmoid(N(mean, std))`` in the path's time (SD3's density for rectified flow)."""

    name = "logit_normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0, stratified: bool = False) -> None:
        super().__init__(stratified)
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def sigma_of(self, u: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        logit = self.mean + self.std * _normal_icdf(u)
        if schedule.kind == "flow":  # sigma = t / (1 - t) = exp(logit t)
            return logit.exp()
        return Uniform().sigma_of(torch.sigmoid(logit), schedule)


class Last(Density):
    """Only the noisiest level of the table."""

    name = "last"

    def sigma_of(self, u: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        return schedule.sigmas[-1].to(u.device).double().expand(u.shape[0])

    def timesteps(self, schedule: NoiseSchedule, batch: int, device: torch.device | str | None = None,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        last = schedule.num_timesteps - 1
        t = torch.full((batch,), last, dtype=torch.long, device=device)
        if schedule.continuous:
            t = t.to(torch.float32)
        return t, schedule.sigmas[-1].to(device).expand(batch)


DENSITIES = {cls.name: cls for cls in (Uniform, LogNormal, LogitNormal, Last)}
