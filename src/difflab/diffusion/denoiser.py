"""One wrapper that turns a trained network into whatever prediction a sampler needs.

A network trained with objective ``"eps"``, ``"x0"`` or ``"v"`` predicts one of three
quantities that, given x_t, determine each other (see ``process``); ``"velocity"`` (flow path)
and ``"edm"`` are preconditioned outputs (``parameterization``), and on the continuous paths
the network's input is the path's own x_t rather than the VP variable the samplers step. Samplers ask the
``Denoiser`` for eps and/or x_0 and never learn which objective was trained. Anything
with the signature ``net(x, t, cond)`` can be wrapped, including a guidance wrapper
around another network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .parameterization import check_output, coefficients, is_vp_target
from .process import (
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    v_from_x0_eps,
)
from .schedule import NoiseSchedule, extract

Network = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class Denoiser:
    """Discrete-time denoiser: ``net`` trained with ``objective`` on ``schedule``.

    ``t`` may be a LongTensor ``[B]`` or a python int (used for the whole batch).
    Network output (possibly bf16 under autocast) is cast to ``x.dtype`` before any
    conversion.

    ``clip_range`` is the range of the data: a sampler's ``clip_denoised`` clamps the x_0
    prediction to [-clip_range, clip_range] (images in [-1, 1]: 1). None for a space with no
    bounded range, such as the scaled latents of a first stage: clipping is then off.
    """

    def __init__(self, net: Network, schedule: NoiseSchedule, objective: str = "eps",
                 clip_range: float | None = 1.0) -> None:
        check_output(schedule, objective)
        self.net = net
        self.schedule = schedule
        self.objective = objective
        self.clip_range = clip_range

    def clip(self, x0: torch.Tensor, enabled: bool = True) -> torch.Tensor:
        """``x0`` clamped to the data range (unchanged when disabled or the range is None)."""
        if not enabled or self.clip_range is None:
            return x0
        return x0.clamp(-self.clip_range, self.clip_range)

    @property
    def clips(self) -> bool:
        """Whether ``clip`` changes anything (the space has a bounded range)."""
        return self.clip_range is not None

    def __repr__(self) -> str:
        return f"Denoiser(objective={self.objective!r}, net={type(self.net).__name__})"

    def _batch_timesteps(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long, device=x.device)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def raw(self, x: torch.Tensor, t: torch.Tensor | int, cond: Any = None) -> torch.Tensor:
        """The network output (in the objective's space), cast to ``x.dtype``."""
        return self.net(x, self._batch_timesteps(x, t), cond).to(x.dtype)

    def predict(
        self, x: torch.Tensor, t: torch.Tensor | int, cond: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x_0) predicted from x_t with one network call."""
        t = self._batch_timesteps(x, t)
        if not is_vp_target(self.schedule, self.objective):
            return self._predict_preconditioned(x, t, cond)
        out = self.raw(x, t, cond)
        if self.objective == "eps":
            eps, x0 = out, predict_x0_from_eps(self.schedule, x, t, out)
        elif self.objective == "x0":
            eps, x0 = predict_eps_from_x0(self.schedule, x, t, out), out
        else:
            eps = predict_eps_from_v(self.schedule, x, t, out)
            x0 = predict_x0_from_v(self.schedule, x, t, out)
        # The float32 schedule coefficients would promote a bf16 x; hand back x's dtype.
        return eps.to(x.dtype), x0.to(x.dtype)

    def _predict_preconditioned(self, x: torch.Tensor, t: torch.Tensor, cond: Any
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x_0) through the output's preconditioning: x (the VP variable at table index t)
        becomes x_sigma = x / sqrt(alpha_bar), the network sees c_in x_sigma, and
        x_0 = c_skip x_sigma + c_out F (``parameterization``)."""
        sigma = extract(self.schedule.sigmas, t, x.ndim).to(x.dtype)
        x_sigma = x / extract(self.schedule.sqrt_alpha_bar, t, x.ndim).to(x.dtype)
        c_in, c_skip, c_out = coefficients(self.schedule, self.objective, sigma)
        out = self.net(x_sigma * c_in, t, cond).to(x.dtype)
        x0 = c_skip * x_sigma + c_out * out
        return predict_eps_from_x0(self.schedule, x, t, x0).to(x.dtype), x0.to(x.dtype)

    def eps(self, x: torch.Tensor, t: torch.Tensor | int, cond: Any = None) -> torch.Tensor:
        """Predicted noise eps(x_t, t)."""
        return self.predict(x, t, cond)[0]

    def x0(
        self, x: torch.Tensor, t: torch.Tensor | int, cond: Any = None, clip: bool = False
    ) -> torch.Tensor:
        """Predicted clean sample x_0(x_t, t), optionally clipped to the data range."""
        return self.clip(self.predict(x, t, cond)[1], clip)

    def v(self, x: torch.Tensor, t: torch.Tensor | int, cond: Any = None) -> torch.Tensor:
        """Predicted velocity v(x_t, t) (Salimans & Ho 2022)."""
        t = self._batch_timesteps(x, t)
        if self.objective == "v" and is_vp_target(self.schedule, "v"):
            return self.raw(x, t, cond)
        eps, x0 = self.predict(x, t, cond)
        return v_from_x0_eps(self.schedule, x0, t, eps).to(x.dtype)


class CallCounter:
    """Counts the network evaluations (NFE) of a sampler: one per call of `net`, also for a
    guided call that runs it on a doubled batch. A context manager removes its hook:

        with CallCounter(net) as counter:
            sampler.sample(Denoiser(net, schedule, "eps"), schedule, shape)
        print(counter.calls)
    """

    def __init__(self, net: torch.nn.Module) -> None:
        self.calls = 0
        self._hook = net.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._hook.remove()

    def __enter__(self) -> "CallCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
