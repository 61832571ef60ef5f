"""Training objective: which target the network regresses and how timesteps are weighted.

- ``"eps"``: predict the noise; with no weighting this is L_simple (Ho et al. 2020, eq. 14).
- ``"x0"``: predict the clean sample.
- ``"v"``: predict the velocity ``sqrt(a) eps - sqrt(1 - a) x_0`` (Salimans & Ho 2022).

Noise-level density ``timesteps``: ``"uniform"`` draws t ~ U{0..T-1} (DDPM); ``"logsnr_normal"``
draws log-SNR ~ N(mean, std) and takes the timestep nearest to it, EDM's log-normal density
over sigma (Karras et al. 2022, sec. 5, P_mean/P_std) in VP terms: log SNR = -2 log sigma. It
spends the training steps on the mid noise levels where samples take shape, instead of on
nearly clean or nearly pure-noise inputs. ``"last"`` trains only t = T-1: with objective x0
and a conditioned network (SR3's input) that is a plain MSE regression from the condition,
the baseline SR3 compares itself with; sample it with one trailing DDIM step.

Weighting ``"min_snr"`` is Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training
via Min-SNR Weighting Strategy"): the x_0-space loss is weighted by ``min(SNR_t, gamma)``,
which, rewritten for each target, is ``min(SNR, gamma) / SNR`` for eps,
``min(SNR, gamma)`` for x_0 and ``min(SNR, gamma) / (SNR + 1)`` for v.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .process import q_sample, v_from_x0_eps
from .schedule import NoiseSchedule, extract

OBJECTIVES = ("eps", "x0", "v")
WEIGHTINGS = ("none", "min_snr")
TIMESTEP_DENSITIES = ("uniform", "logsnr_normal", "last")


def sample_timesteps(schedule: NoiseSchedule, batch: int, *, density: str = "uniform", logsnr_mean: float = 2.0,
                     logsnr_std: float = 2.4, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Training timesteps [B] (long) drawn from the noise-level ``density`` (see module doc)."""
    if density == "uniform":
        return torch.randint(0, schedule.num_timesteps, (batch,), device=device, generator=generator)
    if density == "last":  # only the noisiest level: with objective x0 and a condition, plain regression
        return torch.full((batch,), schedule.num_timesteps - 1, dtype=torch.long, device=device)
    if density != "logsnr_normal":
        raise ValueError(f"unknown timestep density {density!r}; allowed: {', '.join(TIMESTEP_DENSITIES)}")
    if logsnr_std <= 0:
        raise ValueError(f"logsnr_std must be > 0, got {logsnr_std}")
    target = logsnr_mean + logsnr_std * torch.randn(batch, device=device, generator=generator)
    # log_snr falls with t: search the rising -log_snr, then pick the nearer neighbour.
    rising = -schedule.log_snr.to(target.device)
    right = torch.searchsorted(rising, -target).clamp(1, schedule.num_timesteps - 1)
    left = right - 1
    nearer_left = (rising[right] + target).abs() > (rising[left] + target).abs()
    return torch.where(nearer_left, left, right)


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed objectives: {', '.join(OBJECTIVES)}")


def training_target(
    schedule: NoiseSchedule, objective: str, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """The regression target for ``objective`` at (x_0, t, noise)."""
    _check_objective(objective)
    if objective == "eps":
        return noise
    if objective == "x0":
        return x0
    return v_from_x0_eps(schedule, x0, t, noise)


def min_snr_weight(schedule: NoiseSchedule, objective: str, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-gamma weight (Hang et al. 2023) for the given objective, shape [B]."""
    _check_objective(objective)
    snr = extract(schedule.log_snr, t, 1).exp()
    clipped = snr.clamp(max=gamma)
    if objective == "eps":
        return clipped / snr
    if objective == "x0":
        return clipped
    return clipped / (snr + 1.0)


def diffusion_loss(
    schedule: NoiseSchedule,
    net: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    x0: torch.Tensor,
    *,
    objective: str = "eps",
    cond: Any = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    timesteps: str = "uniform",
    logsnr_mean: float = 2.0,
    logsnr_std: float = 2.4,
) -> torch.Tensor:
    """Scalar denoising loss for a batch of clean samples ``x0`` (DDPM Alg. 1).

    Draws ``t`` from the ``timesteps`` density (default ``U{0, .., T-1}``) and ``noise ~ N(0, I)`` unless given (``generator`` must
    live on x0's device), forms ``x_t = q_sample(x0, t, noise)``, calls ``net(x_t, t, cond)``
    and returns the (optionally weighted) mean squared error to the objective's target.
    The error is computed in float32 even if the network ran under bf16 autocast.
    """
    _check_objective(objective)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; allowed weightings: {', '.join(WEIGHTINGS)}")
    if weighting == "min_snr" and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
    batch = x0.shape[0]
    if t is None:
        t = sample_timesteps(schedule, batch, density=timesteps, logsnr_mean=logsnr_mean, logsnr_std=logsnr_std,
                             device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xt = q_sample(schedule, x0, t, noise)
    prediction = net(xt, t, cond)
    target = training_target(schedule, objective, x0, t, noise)
    per_sample = (prediction.float() - target.float()).square().reshape(batch, -1).mean(dim=1)
    if weighting == "min_snr":
        per_sample = per_sample * min_snr_weight(schedule, objective, t, min_snr_gamma).float()
    return per_sample.mean()
