"""What the network outputs, as EDM's preconditioning of a denoiser (Karras et al. 2022, Table 1).

Every output choice, on every path, is one denoiser in the variance-exploding variable
``x_sigma = x_0 + sigma eps`` (``schedule`` module doc):

    D(x_sigma; sigma) = c_skip(sigma) x_sigma + c_out(sigma) F(c_in(sigma) x_sigma, t(sigma))

where F is the network and t its time input. ``c_in`` is the path's own input scale (the network
sees the path's x_t), except for ``edm``, which brings its own. With ``s`` for sigma:

=========== =============================== ================================= =========================
output      c_skip                          c_out                             network regresses
=========== =============================== ================================= =========================
``eps``     1                               -s                                the noise eps
``x0``      0                               1                                 the clean x_0
``v``       1 / (1 + s^2)                   -s / sqrt(1 + s^2)                v = (eps - s x_0) / sqrt(1 + s^2)
``velocity`` 1 / (1 + s)                    -s / (1 + s)                      dx_t/dt = eps - x_0 (flow path)
``edm``     sd^2 / (s^2 + sd^2)             s sd / sqrt(s^2 + sd^2)           (x_0 - c_skip x_sigma) / c_out
=========== =============================== ================================= =========================

(``v`` is Salimans & Ho 2022's velocity of the VP variable; ``velocity`` is the rectified-flow
field of Liu et al. 2022 / Lipman et al. 2022, defined on the flow path only; ``edm`` uses
``c_in = 1 / sqrt(s^2 + sd^2)`` with sd the schedule's ``sigma_data``.) Each row's target is
``(x_0 - c_skip x_sigma) / c_out``, so a squared error on F is ``1 / c_out^2`` times the squared
error on x_0: that is how ``weighting`` turns a weight on the x_0 error into the loss.
"""

from __future__ import annotations

from typing import Any

import torch

from .schedule import BETA_SCHEDULES, NoiseSchedule

OUTPUTS = ("eps", "x0", "v", "velocity", "edm")

__all__ = ["OUTPUTS", "check_output", "coefficients", "is_vp_target", "native_output", "output_target"]


def native_output(kind: str) -> str:
    """The output each path is usually trained with (what ``objective=auto`` picks): the
    rectified-flow velocity on the flow path, EDM's preconditioned output on its VE path, and
    v (Salimans & Ho 2022) on the VP schedules."""
    return {"flow": "velocity", "edm": "edm"}.get(kind, "v")


def is_vp_target(schedule: NoiseSchedule, output: str) -> bool:
    """A VP schedule with eps / x0 / v: the DDPM formulas apply directly (exact, no x_sigma detour)."""
    return schedule.kind in BETA_SCHEDULES and output in ("eps", "x0", "v")


def check_output(schedule: NoiseSchedule, output: str) -> None:
    """Refuse an unknown output, or one that does not fit the path (say what would)."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown objective {output!r}; allowed objectives: {', '.join(OUTPUTS)}")
    if output == "velocity" and schedule.kind != "flow":
        raise ValueError(f"objective velocity is the rectified-flow field: it needs schedule=flow, not the "
                         f"{schedule.kind!r} path (there, predict v, eps, x0 or edm)")


def coefficients(schedule: NoiseSchedule, output: str, sigma: Any) -> tuple[Any, Any, Any]:
    """(c_in, c_skip, c_out) of ``output`` on ``schedule``'s path at VE level(s) ``sigma`` (a float
    or a tensor broadcastable against x); see the module table."""
    if output == "edm":
        sd2 = schedule.sigma_data**2
        root = (sigma**2 + sd2) ** 0.5
        return 1.0 / root, sd2 / (sigma**2 + sd2), sigma * schedule.sigma_data / root
    c_in = schedule.input_scale(sigma)
    if output == "eps":
        return c_in, 1.0, -sigma
    if output == "x0":
        return c_in, 0.0, 1.0
    if output == "v":
        vp_in = (1.0 + sigma**2) ** -0.5
        return c_in, vp_in**2, -sigma * vp_in
    if output == "velocity":
        return c_in, 1.0 / (1.0 + sigma), -sigma / (1.0 + sigma)
    raise ValueError(f"unknown objective {output!r}; allowed objectives: {', '.join(OUTPUTS)}")


def output_target(output: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                  c_skip: Any, c_out: Any) -> torch.Tensor:
    """What the network regresses at (x_0, noise, sigma): the closed form where one is short
    (eps, x0, velocity), else ``(x_0 - c_skip x_sigma) / c_out``."""
    if output == "eps":
        return noise
    if output == "x0":
        return x0
    if output == "velocity":
        return noise - x0
    if output == "v":
        return (noise - sigma * x0) * (1.0 + sigma**2) ** -0.5
    return (x0 - c_skip * (x0 + sigma * noise)) / c_out
