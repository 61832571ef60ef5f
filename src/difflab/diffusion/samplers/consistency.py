"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

Each step maps x at level t straight to the data with the denoiser's x_0 prediction; between
steps the estimate is noised afresh to the next level:

    x_0 = f(x_t, t);   x_t' = sqrt(a_t') x_0 + sqrt(1 - a_t') z,   z ~ N(0, I)

One step from pure noise at T - 1 is one network call. The levels after the first are the
``spacing`` timesteps of the table (trailing: evenly spaced in the table index, starting at T-1),
or the VE levels ``sigmas`` given explicitly (snapped to the nearest table level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..denoiser import Denoiser
from ..density import nearest_level
from ..schedule import NoiseSchedule
from .base import Sampler, check_spacing, check_steps, timesteps


@dataclass
class ConsistencySampler(Sampler):
    """``steps`` x_0 predictions, renoised in between (see the module doc).

    ``sigmas``: the VE levels of steps 2.. (``steps - 1`` of them, decreasing); null: the
    ``spacing`` grid. For a model tuned by ``ConsistencyTuning``; on a plain diffusion model it
    shows what one or two x_0 predictions give without tuning.
    """

    steps: int = 1
    spacing: str = "trailing"
    sigmas: Optional[list[float]] = None
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        check_steps(self.steps)
        check_spacing(self.spacing)
        if self.sigmas is not None:
            levels = [float(s) for s in self.sigmas]
            if len(levels) != self.steps - 1:
                raise ValueError(f"sigmas gives the levels after the first step: {self.steps - 1} of them for "
                                 f"steps={self.steps}, got {len(levels)}")
            if any(not s > 0 for s in levels) or any(a <= b for a, b in zip(levels, levels[1:])):
                raise ValueError(f"sigmas must be positive and decreasing, got {levels}")
            self.sigmas = levels

    def timesteps_for(self, schedule: NoiseSchedule) -> torch.Tensor:
        if self.sigmas is None:
            return timesteps(schedule.num_timesteps, self.steps, self.spacing)
        later = nearest_level(schedule, torch.tensor(self.sigmas, dtype=torch.float64, device=schedule.device))
        ts = torch.cat([later.new_full((1,), schedule.num_timesteps - 1), later]).cpu()
        if bool((ts[1:] >= ts[:-1]).any()):
            raise ValueError(f"sigmas {self.sigmas} fall on table levels {ts.tolist()}: they must be distinct and "
                             "below the schedule's largest level")
        return ts

    def step(self, denoiser: Denoiser, x: torch.Tensor, t: int, alpha_bar_t: float, alpha_bar_prev: float, *,
             last: bool, cond: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = denoiser.x0(x, t, cond, clip=self.clip_denoised)
        if last:
            return x0
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1.0 - alpha_bar_prev) * noise
