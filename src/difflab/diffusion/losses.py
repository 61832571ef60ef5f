"""The training loss: one core over four choices (path, output, density, weighting).

- path: the ``schedule`` (VP linear / cosine / sigmoid, ``flow``, ``edm``);
- output: what the network regresses (``parameterization``: eps, x0, v, velocity, edm);
- density: where the noise levels are drawn (``density``: uniform, log-normal, logit-normal, last);
- weighting: the weight on the x_0 error (``weighting``: simplified, Min-SNR, soft-min-SNR, P2,
  EDM's, EDM2's learned uncertainty).

On a VP schedule with eps / x0 / v the loss is computed exactly as DDPM's Algorithm 1
(``q_sample`` at integer timesteps, the target in closed form); on a continuous path or with
a preconditioned output the network sees ``c_in (x_0 + sigma eps)`` at its fractional time index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from .density import Density, Uniform
from .parameterization import OUTPUTS, check_output, coefficients, is_vp_target, output_target
from .process import q_sample, v_from_x0_eps
from .schedule import NoiseSchedule
from .sigma import t_to_sigma
from .weighting import MinSNR, Simplified, Weighting

OBJECTIVES = OUTPUTS
_SIMPLIFIED, _UNIFORM = Simplified(), Uniform()  # the defaults: DDPM's loss and timesteps

__all__ = ["OBJECTIVES", "diffusion_loss", "min_snr_weight", "training_target"]


def training_target(
    schedule: NoiseSchedule, objective: str, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """The regression target of a VP-schedule objective (eps, x0, v) at (x_0, t, noise)."""
    if objective not in ("eps", "x0", "v"):
        raise ValueError(f"unknown objective {objective!r} for a VP target; allowed objectives: eps, x0, v")
    if objective == "eps":
        return noise
    if objective == "x0":
        return x0
    return v_from_x0_eps(schedule, x0, t, noise)


def min_snr_weight(schedule: NoiseSchedule, objective: str, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma's weight on the network's error at integer timesteps ``t`` [B]
    (``min(SNR, gamma) c_out^2``: eps ``min / SNR``, x0 ``min``, v ``min / (SNR + 1)``)."""
    check_output(schedule, objective)
    sigma = schedule.sigmas[t.to(schedule.device)].double()
    c_out = coefficients(schedule, objective, sigma)[2]
    c_out = torch.as_tensor(c_out, dtype=torch.float64).expand_as(sigma)
    return (MinSNR(gamma).x0_weight(sigma, schedule, c_out) * c_out**2).to(torch.float32)


def diffusion_loss(
    schedule: NoiseSchedule,
    net: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    x0: torch.Tensor,
    *,
    objective: str = "eps",
    cond: Any = None,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    weighting: Optional[Weighting] = None,
    density: Optional[Density] = None,
) -> torch.Tensor:
    """Scalar denoising loss for a batch of clean samples ``x0``.

    Draws the time inputs ``t`` from ``density`` (default ``Uniform()``: DDPM's U{0..T-1}) and
    ``noise ~ N(0, I)`` unless given (``generator`` must live on x0's device), calls
    ``net(x_t, t, cond)`` and returns the mean over the batch of ``weighting``'s loss (default
    ``Simplified()``: the plain MSE to the output's target). Given ``t`` are table indices
    (long on a VP schedule, fractional on a continuous path). The error is float32 even if the
    network ran under bf16 autocast.
    """
    check_output(schedule, objective)
    weighting = weighting if weighting is not None else _SIMPLIFIED
    batch = x0.shape[0]
    if t is None:
        t, sigma = (density or _UNIFORM).timesteps(schedule, batch, device=x0.device, generator=generator)
    else:
        sigma = schedule.sigmas.to(t.device)[t] if not t.is_floating_point() else \
            t_to_sigma(schedule, t).to(t.device, torch.float32)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    sigma = sigma.to(x0.device, torch.float32)
    level = sigma.reshape(batch, *([1] * (x0.ndim - 1)))
    c_in, c_skip, c_out = coefficients(schedule, objective, level)
    if is_vp_target(schedule, objective):
        xt = q_sample(schedule, x0, t, noise)  # DDPM Alg. 1, bit for bit
        target = training_target(schedule, objective, x0, t, noise)
    else:
        xt = c_in * (x0 + level * noise)
        target = output_target(objective, x0, noise, level, c_skip, c_out)
    prediction = net(xt, t, cond)
    error = (prediction.float() - target.float()).square().reshape(batch, -1).mean(dim=1)
    c_out = torch.as_tensor(c_out, dtype=torch.float32, device=x0.device).expand_as(level).reshape(batch)
    return weighting.loss(error, sigma, schedule, c_out).mean()
