"""Loss weights, each written as its weight on the x_0 error.

A squared error on the network output F is ``1 / c_out^2`` times the squared error on x_0
(``parameterization``), so a weighting ``w(sigma)`` on ``||D - x_0||^2`` is the weight
``w c_out^2`` on the network's own error. With ``SNR = 1 / sigma^2`` (= alpha_bar / (1 - alpha_bar)
on a VP schedule) and ``sd`` the schedule's ``sigma_data``:

- ``Simplified``: weight 1 on the network's error, ``w = 1 / c_out^2``: L_simple of Ho et al. 2020
  for eps (w = SNR), the plain regression of each output otherwise; with output ``edm`` it is
  EDM's own loss.
- ``MinSNR(gamma)``: ``w = min(SNR, gamma)`` (Hang et al. 2023); for eps that is
  ``min(SNR, gamma) / SNR`` on the eps error and for v ``min(SNR, gamma) / (SNR + 1)``
  (diffusers' training scripts since its PR #6307).
- ``SoftMinSNR(gamma)``: ``w = SNR gamma / (SNR + gamma)``, a smooth min (Crowson et al. 2024,
  HDiT, sec. 5); with gamma = 1 / sd^2 (its default) ``w = 1 / (sigma^2 + sd^2)``, k-diffusion's
  ``soft-min-snr`` on EDM's output.
- ``P2(k, gamma)``: ``w = SNR / (k + SNR)^gamma``: P2's ``1 / (k + SNR)^gamma`` on the eps error
  (Choi et al. 2022, eq. 8).
- ``EDMWeight``: ``w = (sigma^2 + sd^2) / (sigma sd)^2`` (Karras et al. 2022, eq. 8 / Table 1):
  weight 1 on the error of EDM's preconditioned output, whatever the output.
- ``Uncertainty(base)``: EDM2's learned weighting (Karras et al. 2024, sec. 3, eq. 21):
  ``w(sigma) / exp(u(sigma)) ||D - x_0||^2 + u(sigma)``, u a small learned function of the noise
  level (Fourier features of log sigma / 4, then a linear layer), trained with the network; it
  evens out the loss over noise levels. ``base`` is the fixed weight it multiplies (EDM's).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .schedule import NoiseSchedule

__all__ = ["EDMWeight", "MinSNR", "P2", "SoftMinSNR", "Simplified", "Uncertainty", "WEIGHTINGS", "Weighting"]


class Weighting(nn.Module):
    """Base: ``x0_weight(sigma)`` and the per-sample loss it gives (``loss``)."""

    name = "weighting"

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")

    def x0_weight(self, sigma: torch.Tensor, schedule: NoiseSchedule, c_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def loss(self, error: torch.Tensor, sigma: torch.Tensor, schedule: NoiseSchedule,
             c_out: torch.Tensor) -> torch.Tensor:
        """Per-sample weighted loss [B] from the network's mean squared error [B] at levels sigma."""
        return self.x0_weight(sigma, schedule, c_out) * c_out**2 * error


class Simplified(Weighting):
    """Weight 1 on the network's own error."""

    name = "simplified"

    def x0_weight(self, sigma: torch.Tensor, schedule: NoiseSchedule, c_out: torch.Tensor) -> torch.Tensor:
        return 1.0 / c_out**2

    def loss(self, error: torch.Tensor, sigma: torch.Tensor, schedule: NoiseSchedule,
             c_out: torch.Tensor) -> torch.Tensor:
        return error  # exactly, not through 1 / c_out^2 * c_out^2


def _check_positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


class MinSNR(Weighting):
    """``min(SNR, gamma)`` on the x_0 error (Hang et al. 2023)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        super().__init__()
        self.gamma = _check_positive("gamma", gamma)

    def x0_weight(self, sigma: torch.Tensor, schedule: NoiseSchedule, c_out: torch.Tensor) -> torch.Tensor:
        return (1.0 / sigma**2).clamp(max=self.gamma)


class SoftMinSNR(Weighting):
    """``SNR gamma / (SNR + gamma)`` on the x_0 error; gamma None: 1 / sigma_data^2."""

    name = "soft_min_snr"

    def __init__(self, gamma: Optional[float] = None) -> None:
        super().__init__()
        self.gamma = None if gamma is None else _check_positive("gamma", gamma)

    def x0_weight(self, sigma: torch.Tensor, schedule: NoiseSchedule, c_out: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma if self.gamma is not None else 1.0 / schedule.sigma_data**2
        return 1.0 / (sigma**2 + 1.0 / gamma)  # = SNR gamma / (SNR + gamma), finite at sigma -> 0


class P2(Weighting):
    """``SNR / (k + SNR)^gamma`` on the x_0 error (Choi et al. 2022)."""

    name = "p2"

    def __init__(self, k: float = 1.0, gamma: float = 1.0) -> None:
        super().__init__()
        self.k = _check_positive("k", k)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def x0_weight(self, sigma: torch.Tensor, schedule: NoiseSchedule, c_out: torch.Tensor) -> torch.Tensor:
        snr = 1.0 / sigma**2
        return snr / (self.k + snr) ** self.gamma


class EDMWeight(Weighting):
    """``(sigma^2 + sd^2) / (sigma sd)^2`` on the x_0 error (EDM)."""

    name = "edm"

    def x0_weight(self, sigma: torch.Tensor, schedule: NoiseSchedule, c_out: torch.Tensor) -> torch.Tensor:
        sd = schedule.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2


class Uncertainty(Weighting):
    """EDM2's learned uncertainty u(sigma) over a fixed base weight (see the module doc)."""

    name = "uncertainty"

    def __init__(self, base: str = "edm", features: int = 64) -> None:
        super().__init__()
        if base not in ("edm", "simplified"):
            raise ValueError(f"uncertainty base {base!r}: use edm or simplified")
        if features < 2 or features % 2:
            raise ValueError(f"features must be an even number >= 2, got {features}")
        self.base_name, self.features = base, int(features)
        self._base = EDMWeight() if base == "edm" else Simplified()
        # Random Fourier features (fixed, as EDM2's MPFourier), then a learned linear map to u.
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features // 2, generator=generator))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features // 2, generator=generator))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)  # u = 0 at the start: the base weighting

    def log_variance(self, sigma: torch.Tensor) -> torch.Tensor:
        """u(sigma) [B]."""
        c_noise = sigma.float().log()[:, None] / 4
        angle = c_noise * self.freqs + self.phases
        return self.linear(torch.cat([angle.cos(), angle.sin()], dim=1) * math.sqrt(2)).squeeze(1)

    def x0_weight(self, sigma: torch.Tensor, schedule: NoiseSchedule, c_out: torch.Tensor) -> torch.Tensor:
        return self._base.x0_weight(sigma, schedule, c_out) / self.log_variance(sigma).exp()

    def loss(self, error: torch.Tensor, sigma: torch.Tensor, schedule: NoiseSchedule,
             c_out: torch.Tensor) -> torch.Tensor:
        u = self.log_variance(sigma)
        return self._base.loss(error, sigma, schedule, c_out) / u.exp() + u


WEIGHTINGS = {cls.name: cls for cls in (Simplified, MinSNR, SoftMinSNR, P2, EDMWeight, Uncertainty)}
