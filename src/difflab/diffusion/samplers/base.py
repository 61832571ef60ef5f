"""What every discrete-time sampler shares: the timestep array and the sampling loop.

A sampler walks down ONE descending array of integer timesteps built by ``timesteps``.
The step from index ``i`` goes to element ``i + 1``, and from the last element to ``-1``,
where alpha_bar = 1 (the data). The previous timestep is never computed as
``t - T // steps``, which is wrong for "trailing" and "linspace" spacings.
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from ..denoiser import Denoiser
from ..schedule import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")


def check_spacing(spacing: str) -> None:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; allowed spacings: {', '.join(SPACINGS)}")


def check_steps(steps: int, num_timesteps: int | None = None) -> None:
    """``steps`` must be an int in [1, T] (only the lower bound when T is not known yet)."""
    upper = num_timesteps if num_timesteps is not None else float("inf")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= upper:
        allowed = f"[1, {num_timesteps}]" if num_timesteps is not None else ">= 1"
        raise ValueError(f"steps must be an integer in {allowed}, got {steps!r}")


def timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> torch.Tensor:
    """Descending LongTensor of ``steps`` distinct timesteps in [0, T) to sample on.

    - ``"leading"``: ``0, k, 2k, ...`` reversed with ``k = T // steps`` (the "linear"
      sub-sequence of Song et al. 2021, DDIM appendix); ends at 0, may stop short of T - 1.
    - ``"trailing"``: ``round(T - i * T / steps) - 1``; starts at T - 1 (Lin et al. 2024,
      "Common diffusion noise schedules and sample steps are flawed").
    - ``"linspace"``: ``round(linspace(0, T - 1, steps))`` reversed; contains 0 and T - 1.
    """
    check_spacing(spacing)
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    check_steps(steps, num_timesteps)
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.long) * (num_timesteps // steps)
        return ts.flip(0)
    if spacing == "trailing":
        i = torch.arange(steps, dtype=torch.float64)
        return (torch.round(num_timesteps - i * num_timesteps / steps) - 1).long()
    grid = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64)
    return torch.round(grid).long().flip(0)


def _track(iterable: Sequence[int], description: str, enabled: bool):
    if not enabled:
        return iterable
    from rich.progress import track

    return track(iterable, description=description, total=len(iterable), transient=True)


class Sampler(abc.ABC):
    """Base class: subclasses choose the timestep array and implement one step."""

    @abc.abstractmethod
    def timesteps_for(self, schedule: NoiseSchedule) -> torch.Tensor:
        """The descending timestep array this sampler uses on ``schedule``."""

    @abc.abstractmethod
    def step(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        t: int,
        alpha_bar_t: float,
        alpha_bar_prev: float,
        *,
        last: bool,
        cond: Any = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Map x at timestep ``t`` (alpha_bar_t) to the previous timestep (alpha_bar_prev).

        ``last`` marks the final step, which lands on alpha_bar = 1 and adds no noise.
        """

    def after_step(self, denoiser: Denoiser, x: torch.Tensor, t: int, *, cond: Any = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Hook after every step but the last, with x now at timestep ``t`` (e.g. a corrector)."""
        return x

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
        """Run the reverse chain from ``x_T`` (or fresh N(0, I) noise of ``shape``).

        Exactly one of ``shape`` and ``x_T`` must be given. Returns the final sample, and
        with ``return_trajectory`` also the list of x after every step (on CPU).
        """
        if (shape is None) == (x_T is None):
            raise ValueError("give exactly one of `shape` and `x_T`")
        device = schedule.device
        if x_T is None:
            x = torch.randn(tuple(shape), generator=generator, device=device)
        else:
            x = x_T.to(device)
        ts = self.timesteps_for(schedule)
        # Host transfers happen here, once: per-step coefficients are python floats, so the
        # loop never waits on the device. The step after the last element goes to -1.
        prev = torch.cat([ts[1:], ts.new_full((1,), -1)])
        alpha_bar_t = schedule.alpha_bar_at(ts).double().tolist()
        alpha_bar_prev = schedule.alpha_bar_at(prev).double().tolist()
        ts_list, prev_list = ts.tolist(), prev.tolist()
        trajectory: list[torch.Tensor] = []
        description = f"{type(self).__name__} ({len(ts_list)} steps)"
        for i in _track(range(len(ts_list)), description, progress):
            last = i == len(ts_list) - 1
            x = self.step(
                denoiser,
                x,
                ts_list[i],
                alpha_bar_t[i],
                alpha_bar_prev[i],
                last=last,
                cond=cond,
                generator=generator,
            )
            if not last:
                x = self.after_step(denoiser, x, prev_list[i], cond=cond, generator=generator)
            if return_trajectory:
                trajectory.append(x.detach().cpu())
        return (x, trajectory) if return_trajectory else x
