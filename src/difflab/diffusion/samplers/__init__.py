"""Discrete-time samplers: one module per family, one registry to build them by name."""

from __future__ import annotations

from .base import SPACINGS, Sampler, timesteps
from .ddim import DDIMSampler, ddim_invert
from .ddpm import DDPMSampler

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
}


def build_sampler(name: str, **kwargs) -> Sampler:
    """Instantiate the sampler registered under ``name`` with its constructor ``kwargs``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](**kwargs)


__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "DDIMSampler",
    "DDPMSampler",
    "Sampler",
    "build_sampler",
    "ddim_invert",
    "timesteps",
]
