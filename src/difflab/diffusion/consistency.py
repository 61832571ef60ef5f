"""Consistency tuning: a trained denoiser turned into a one- or two-step sampler.

ECT (Geng et al. 2024, "Consistency Models Made Easy"): a diffusion model's x_0 prediction
D(x_t, t) is already a consistency function f(x_t, t) at r = 0 (its training target is the clean
x_0). Tuning asks f to agree with itself along the path: for t, a less noisy level r < t and ONE
noise draw eps,

    loss = w(t) * d(f(x_0 + t eps, t), stopgrad f(x_0 + r eps, r)),     f(x, 0) = x_0,

with r moved towards t stage by stage, so training starts as plain denoising (r = 0) and ends as
consistency training with a small gap (the paper's mapping, its eq. for p(r | t, stage)):

    r = t * (1 - q^-(stage + 1) * (1 + k * sigmoid(-b t))),   clamped at 0.

Levels are VE sigmas (x_sigma = x_0 + sigma eps); t is drawn log-normal (P_mean, P_std); d is
the pseudo-Huber distance sqrt(|a - b|^2 + c^2) - c over the whole image (c = 0: the L2 norm,
ECT's adaptive weighting of the squared error with p = 1/2); w(t) = 1 / t^2 + 1 / sigma_data^2
(the paper's "SNR + k"). Here the levels are the schedule's table levels (t snapped to the
nearest, r to the nearest level at or below it and at least one level under t), so every path
and output the samplers walk is tuned unchanged, through the same ``Denoiser``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .denoiser import Denoiser
from .density import nearest_level
from .process import q_sample
from .schedule import NoiseSchedule

__all__ = ["ConsistencyTuning"]


class ConsistencyTuning:
    """ECT's loss and its r(t) schedule over ``stages`` stages (see the module doc).

    ``p_mean`` / ``p_std``: the log-normal density of t (ECT: -1.1, 2.0); ``q``: how fast the gap
    t - r shrinks from one stage to the next (> 1); ``k``, ``b``: the gap's extra width at low
    noise; ``c``: the pseudo-Huber constant (0: the L2 norm); ``stages``: how many times the gap
    shrinks over the run (>= 1); ``sigma_data``: null takes the schedule's.
    """

    def __init__(self, p_mean: float = -1.1, p_std: float = 2.0, q: float = 2.0, k: float = 8.0, b: float = 1.0,
                 c: float = 0.0, stages: int = 4, sigma_data: Optional[float] = None) -> None:
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        if not q > 1:
            raise ValueError(f"q must be > 1 (the gap t - r shrinks by it each stage), got {q}")
        if k < 0 or b < 0 or c < 0:
            raise ValueError(f"k, b and c must be >= 0, got k={k}, b={b}, c={c}")
        if isinstance(stages, bool) or int(stages) != stages or stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
        if sigma_data is not None and not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0 or null, got {sigma_data}")
        self.p_mean, self.p_std, self.q, self.k, self.b, self.c = map(float, (p_mean, p_std, q, k, b, c))
        self.stages, self.sigma_data = int(stages), sigma_data

    def __repr__(self) -> str:
        return (f"ConsistencyTuning(p_mean={self.p_mean}, p_std={self.p_std}, q={self.q}, k={self.k}, b={self.b}, "
                f"c={self.c}, stages={self.stages})")

    def stage(self, step: int, total_steps: int) -> int:
        """The stage of training step ``step`` of ``total_steps``: equal parts of the run."""
        return min(self.stages - 1, max(0, int(step)) * self.stages // max(int(total_steps), 1))

    def r_of(self, sigma_t: torch.Tensor, stage: int) -> torch.Tensor:
        """The paper's mapping t -> r at ``stage`` (continuous sigmas; 0 where it would go below)."""
        gap = self.q ** -(stage + 1) * (1.0 + self.k * torch.sigmoid(-self.b * sigma_t))
        return (sigma_t * (1.0 - gap)).clamp(min=0.0)

    def levels(self, schedule: NoiseSchedule, batch: int, stage: int, device: torch.device | str | None = None,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Table indices (t, r) [batch], long, with r < t; r = -1 is the clean end (sigma 0)."""
        normal = torch.randn(batch, device=device, generator=generator, dtype=torch.float64)
        t = nearest_level(schedule, (self.p_mean + self.p_std * normal).exp())
        sigmas = schedule.sigmas.to(t.device).double()
        t = t.clamp(min=1)  # level 0 has no level below it but the data itself: keep a gap
        target = self.r_of(sigmas[t], stage)
        # The largest level <= target sigma, at least one level under t; -1 below the table's first.
        r = torch.searchsorted(sigmas, target, right=True) - 1
        return t, torch.minimum(r, t - 1)

    def weight(self, sigma_t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """w(t) = 1 / t^2 + 1 / sigma_data^2."""
        sd = self.sigma_data or schedule.sigma_data  # every schedule has one (difflab-train measures it)
        return sigma_t.double().pow(-2) + 1.0 / sd**2

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pseudo-Huber distance per sample [B] (float32): sqrt(|a - b|^2 + c^2) - c."""
        squared = (a.float() - b.float()).square().reshape(a.shape[0], -1).sum(dim=1)
        return (squared + self.c**2).sqrt() - self.c

    def loss(self, denoiser: Denoiser, x0: torch.Tensor, stage: int, cond: Any = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The batch mean of w(t) d(f(x_t, t), stopgrad f(x_r, r)), f the denoiser's x_0 (unclipped)."""
        schedule = denoiser.schedule
        t, r = self.levels(schedule, x0.shape[0], stage, device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        prediction = denoiser.x0(q_sample(schedule, x0, t, noise).to(x0.dtype), t, cond)
        target = x0
        noisy = r >= 0
        if bool(noisy.any()):
            with torch.no_grad():  # the target is the same network one level lower, not trained through
                lower = denoiser.x0(q_sample(schedule, x0, r.clamp(min=0), noise).to(x0.dtype), r.clamp(min=0), cond)
            target = torch.where(noisy.reshape(-1, *[1] * (x0.ndim - 1)), torch.nan_to_num(lower), x0)
        sigma_t = schedule.sigmas.to(t.device)[t]
        weight = self.weight(sigma_t, schedule).to(torch.float32)
        return (weight * self.distance(prediction, target)).mean()

