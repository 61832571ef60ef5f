"""Samplers: one module per family, one registry to build them by name.

Discrete-time (integer timesteps from ``timesteps``): ``ddpm``, ``ddim``, ``pc``
(predictor-corrector with a Langevin corrector), ``consistency`` (multistep consistency
sampling: one x_0 prediction per step, for a consistency-tuned model). Sigma space (``..sigma``): ``euler`` and
``heun`` (EDM), ``dpmpp`` (DPM-Solver++ 2M on the discrete timestep grid).
"""

from __future__ import annotations

from .base import SPACINGS, Sampler, timesteps
from .consistency import ConsistencySampler
from .ddim import DDIMSampler, ddim_invert
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverPPSampler
from .karras import EulerSampler, HeunSampler, KarrasSampler, SigmaSampler
from .langevin import PREDICTORS, LangevinSampler, PCSampler, langevin_correct

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "euler": EulerSampler,
    "heun": HeunSampler,
    "dpmpp": DPMSolverPPSampler,
    "pc": PCSampler,
    "consistency": ConsistencySampler,
}


def build_sampler(name: str, **kwargs) -> Sampler:
    """Instantiate the sampler registered under ``name`` with its constructor ``kwargs``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](**kwargs)


__all__ = [
    "PREDICTORS",
    "SAMPLERS",
    "SPACINGS",
    "ConsistencySampler",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPPSampler",
    "EulerSampler",
    "HeunSampler",
    "KarrasSampler",
    "LangevinSampler",
    "PCSampler",
    "Sampler",
    "SigmaSampler",
    "build_sampler",
    "ddim_invert",
    "langevin_correct",
    "timesteps",
]
