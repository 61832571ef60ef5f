"""Training-free restoration with an unconditional model: inpainting and super-resolution.

Every method consumes a degradation ``Operator`` (``degradation``), its measurement
``y = A(x)``, a ``Denoiser`` and any sampler, and walks the sampler's own chain of noise
levels. Level ``k = 0 .. n`` of a sampler with ``n`` steps is its k-th noise level, ``n``
being the data. Methods (implemented from the papers):

- ``replacement`` (Song et al. 2021, "Score-based generative modeling through SDEs",
  sec. 5 / app. I.2, "imputation"): after every step to level k, the part of x that the
  measurement sees is replaced by the measurement noised to level k with fresh noise,
  ``x <- (I - A^+ A) x + A^+ A q_k(A^+ y)``. For a mask that copies the noised known
  pixels; for downsampling it swaps the low-pass part of x.
- ``repaint`` (Lugmayr et al. 2022, "RePaint", Alg. 1 and sec. 4.2): replacement, plus
  resampling: every ``jump_length`` levels the chain jumps back up ``jump_length`` levels
  by the forward process q(x_{k-j} | x_k) and comes down again, ``jump_n_sample`` passes in
  all, so the generated part can harmonise with the known one.
- ``ddnm`` (Wang et al. 2023, "Zero-shot image restoration using denoising diffusion
  null-space model", eq. 13): the network's x_0 prediction is projected,
  ``x0 <- A^+ y + (I - A^+ A) x0``, before the sampler uses it; implemented as a network
  wrapper (``NullSpaceProjection``), so every sampler gets it. ``travel_length`` and
  ``travel_repeat`` give DDNM's time-travel (its sec. 3.3): the same path as RePaint's
  resampling, with its own knobs so that both can sit in one evaluation grid.
- ``ilvr`` (Choi et al. 2021, "ILVR", eq. 8): x_{k} <- x_k - phi(x_k) + phi(y_k) with the
  low-pass filter phi = A^+ A of a ``Downsample`` operator, during the first ``ilvr_until``
  fraction of the levels. With ``ilvr_until = 1`` this is the replacement update written
  for downsampling; the range lets the result drift from the reference (ILVR sec. 3.2).

- ``guided`` (Ho et al. 2022, "Video diffusion models", sec. 3.1, "reconstruction guidance"):
  replacement, plus the network's x_0 prediction moved down the gradient of its measurement
  error ``||y - A(x_0)||^2`` with respect to x_t, weight ``reconstruction_weight``
  (``ReconstructionGuidance``, a network wrapper like DDNM's, so every sampler gets it). Each
  step runs the network forward and backward.

Every method ends with ``operator.project(x, y)`` on the data level (ILVR only when its
range reaches it), so known pixels come out bit-identical to the input and
``A(restored) = y`` up to rounding for downsampling.

Discrete samplers (DDPM, DDIM, PC) step over integer timesteps on x_t; the sigma samplers
(Euler, Heun, DPM-Solver++) step on x_sigma = x_t / sqrt(alpha_bar). A small chain adapter
gives both the same four operations: step down one level, jump up, noise an image to a level,
and the number of levels. A jump clears a multistep sampler's memory of earlier steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .degradation import Downsample, Operator
from .parameterization import coefficients
from .denoiser import Denoiser
from .samplers.base import Sampler, _track
from .samplers.karras import SigmaSampler
from .schedule import NoiseSchedule
from .sigma import SigmaDenoiser, t_to_sigma

METHODS = ("replacement", "repaint", "ddnm", "ilvr", "guided")


class RestorationError(ValueError):
    """A restoration setting that does not fit the method, sampler or operator."""


# --------------------------------------------------------------------------- DDNM's projection

class _X0Edit:
    """``net(x_t, t, cond)`` whose x_0 prediction is edited by ``edit`` before the sampler reads it.

    The output stays in the network's objective space (eps, x0, v, velocity or edm, on any path),
    converted through x_0 at the noise level of ``t`` (integer or fractional, via ``t_to_sigma``)
    with the output's preconditioning, so the ``Denoiser`` and ``SigmaDenoiser`` read it as they
    read the plain network.
    """

    def __init__(self, net: Callable[..., torch.Tensor], schedule: NoiseSchedule, objective: str,
                 operator: Operator, y: torch.Tensor) -> None:
        self.net, self.schedule, self.objective = net, schedule, objective
        self.operator, self.y = operator, y

    def _coefficients(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sigma = t_to_sigma(self.schedule, t).to(x.device, torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        # Any path and output (parameterization): x is c_in x_sigma, x_0 = c_skip x_sigma + c_out F.
        return tuple(torch.as_tensor(c, dtype=torch.float64, device=x.device)
                     for c in coefficients(self.schedule, self.objective, sigma))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        c_in, c_skip, c_out = self._coefficients(x, t)
        x0, out = self.edit(x, t, cond, c_in, c_skip, c_out)
        x_sigma = x.double() / c_in
        return ((x0.double() - c_skip * x_sigma) / c_out).to(out.dtype)

    def edit(self, x: torch.Tensor, t: torch.Tensor, cond: Any, c_in: torch.Tensor, c_skip: torch.Tensor,
             c_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the edited x_0 prediction, the network's raw output)."""
        raise NotImplementedError


class NullSpaceProjection(_X0Edit):
    """DDNM: the x_0 prediction replaced by ``A^+ y + (I - A^+ A) x_0``."""

    def edit(self, x, t, cond, c_in, c_skip, c_out):
        out = self.net(x, t, cond).to(x.dtype)
        x0 = (c_skip * (x.double() / c_in) + c_out * out.double()).to(x.dtype)
        return self.operator.project(x0, self.y.to(x.device, x.dtype)), out


class ReconstructionGuidance(_X0Edit):
    """Reconstruction guidance (Ho et al. 2022, "Video diffusion models", eq. 7): the x_0
    prediction moved down the gradient of its measurement error,
    ``x0 <- x0 - (w / 2) alpha_t grad_{z_t} ||y - A(x0(z_t))||^2`` with ``z_t`` the VP variable
    (``alpha_t = sqrt(alpha_bar)``). The network input is ``x = c_in x_sigma`` and
    ``z_t = sqrt(alpha_bar) x_sigma``, so ``alpha_t grad_z = c_in grad_x``: one backward pass
    through the network per call, whatever the path and output. The step conditions the whole
    image on y through the network's Jacobian, which pasting known pixels (replacement) never does.
    """

    def __init__(self, net, schedule, objective, operator, y, weight: float) -> None:
        super().__init__(net, schedule, objective, operator, y)
        self.weight = weight

    def edit(self, x, t, cond, c_in, c_skip, c_out):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = self.net(x_in, t, cond).to(x.dtype)
            x0 = c_skip.to(x.dtype) * (x_in / c_in.to(x.dtype)) + c_out.to(x.dtype) * out
            error = (self.operator.A(x0) - self.y.to(x.device, x.dtype)).pow(2).sum()
            grad, = torch.autograd.grad(error, x_in)
        x0 = x0.detach() - (0.5 * self.weight) * c_in.to(x.dtype) * grad
        return x0, out.detach()


# --------------------------------------------------------------------------- chains

class _Chain:
    """A sampler's levels 0..n as four operations, in the sampler's own variables."""

    n: int

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def step(self, x: torch.Tensor, k: int, cond: Any, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def alpha_bar(self, k: int) -> float:
        raise NotImplementedError

    def noised(self, x0: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
        """x0 drawn to level k by the forward process with ``noise``, in the chain's variables."""
        a = self.alpha_bar(k)
        return (math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise) * self.vp_to_own(k)

    def vp_to_own(self, k: int) -> float:
        return 1.0

    def jump(self, x: torch.Tensor, k: int, up: int, generator: torch.Generator | None) -> torch.Tensor:
        """x at level k drawn up to the noisier level ``up`` by q(x_up | x_k) (DDPM eq. 4 composed)."""
        ratio = self.alpha_bar(up) / self.alpha_bar(k)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_vp = x / self.vp_to_own(k)
        return (math.sqrt(ratio) * x_vp + math.sqrt(1.0 - ratio) * noise) * self.vp_to_own(up)


class _DiscreteChain(_Chain):
    def __init__(self, sampler: Sampler, denoiser: Denoiser, schedule: NoiseSchedule) -> None:
        self.sampler, self.denoiser = sampler, denoiser
        ts = sampler.timesteps_for(schedule)
        self.ts = ts.tolist()
        self.alpha_bars = schedule.alpha_bar_at(ts).double().tolist() + [1.0]
        self.n = len(self.ts)

    def alpha_bar(self, k: int) -> float:
        return self.alpha_bars[k]

    def step(self, x, k, cond, generator):
        last = k == self.n - 1
        x = self.sampler.step(self.denoiser, x, self.ts[k], self.alpha_bars[k], self.alpha_bars[k + 1],
                              last=last, cond=cond, generator=generator)
        if not last:
            x = self.sampler.after_step(self.denoiser, x, self.ts[k + 1], cond=cond, generator=generator)
        return x


class _SigmaChain(_Chain):
    def __init__(self, sampler: SigmaSampler, denoiser: Denoiser, schedule: NoiseSchedule) -> None:
        self.sampler, self.denoise = sampler, SigmaDenoiser(denoiser)
        self.sigmas = sampler.sigmas_for(schedule).tolist()
        self.n = len(self.sigmas) - 1
        self.state: dict[str, Any] = {}

    def start(self, noise):
        return noise * self.sampler.initial_scale(self.sigmas[0])

    def alpha_bar(self, k: int) -> float:
        return 1.0 / (1.0 + self.sigmas[k] ** 2)

    def vp_to_own(self, k: int) -> float:
        return math.sqrt(1.0 + self.sigmas[k] ** 2)  # x_sigma = x_t / sqrt(alpha_bar)

    def step(self, x, k, cond, generator):
        return self.sampler.sigma_step(self.denoise, x, self.sigmas, k, cond=cond, generator=generator,
                                       state=self.state)

    def jump(self, x, k, up, generator):
        self.state.clear()  # a multistep solver's previous x0 belongs to the path before the jump
        return super().jump(x, k, up, generator)


def resample_path(n: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The levels RePaint visits: down from 0 to n, and at every multiple k < n of
    ``jump_length`` back up to k - jump_length and down again, ``jump_n_sample - 1`` times."""
    path = [0]
    for k in range(1, n + 1):
        path.append(k)
        if jump_n_sample > 1 and k % jump_length == 0 and k < n:
            for _ in range(jump_n_sample - 1):
                path.extend(range(k - jump_length, k + 1))
    return path


# --------------------------------------------------------------------------- the method

@dataclass
class Restoration:
    """A training-free restoration method and its knobs (see the module docstring).

    ``jump_length`` and ``jump_n_sample`` are RePaint's, ``travel_length`` and
    ``travel_repeat`` DDNM's time-travel; 1 sample / repeat means no resampling. ``ilvr_until``: fraction of the levels,
    from the noisiest, on which ILVR imposes the low-pass of y. ``reconstruction_weight``: w of
    reconstruction guidance (``guided``).
    """

    method: str = "repaint"
    jump_length: int = 5
    jump_n_sample: int = 5
    ilvr_until: float = 1.0
    travel_length: int = 5
    travel_repeat: int = 1
    reconstruction_weight: float = 8.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RestorationError(f"unknown restoration method {self.method!r}; allowed: {', '.join(METHODS)}")
        for name in ("jump_length", "jump_n_sample", "travel_length", "travel_repeat"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RestorationError(f"{name}={value!r} must be an integer >= 1")
        if not 0.0 <= self.ilvr_until <= 1.0:
            raise RestorationError(f"ilvr_until={self.ilvr_until!r} must lie in [0, 1]")
        if not (isinstance(self.reconstruction_weight, (int, float)) and self.reconstruction_weight > 0):
            raise RestorationError(f"reconstruction_weight={self.reconstruction_weight!r} must be a number > 0")

    @property
    def jumps(self) -> tuple[str, int, str, int]:
        """(name, length, name, passes) of the resampling knobs this method uses."""
        if self.method == "ddnm":
            return "travel_length", self.travel_length, "travel_repeat", self.travel_repeat
        return "jump_length", self.jump_length, "jump_n_sample", self.jump_n_sample

    @property
    def resamples(self) -> bool:
        return self.method in ("repaint", "ddnm") and self.jumps[3] > 1

    def path(self, n: int) -> list[int]:
        if not self.resamples:
            return list(range(n + 1))
        name, length, _, passes = self.jumps
        if length >= n:
            raise RestorationError(f"{name}={length} must be smaller than the sampler's {n} steps "
                                   f"(a jump goes back {name} levels): lower it or use more steps.")
        return resample_path(n, length, passes)

    def network_calls(self, n: int, calls_per_step: int = 1) -> int:
        """Sampler steps taken (times the sampler's network calls per step)."""
        path = self.path(n)
        return calls_per_step * sum(1 for a, b in zip(path[:-1], path[1:]) if b == a + 1)

    @torch.no_grad()
    def restore(self, denoiser: Denoiser, schedule: NoiseSchedule, sampler: Sampler, operator: Operator,
                y: torch.Tensor, shape: tuple[int, ...], *, cond: Any = None,
                generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                progress: bool = False) -> torch.Tensor:
        """Images of ``shape`` ([B, C, H, W]) whose measurement is ``y``, drawn with ``sampler``."""
        device = schedule.device
        probe = torch.empty(shape, device="meta")
        operator.check(probe)
        if self.method == "ilvr" and not isinstance(operator, Downsample):
            raise RestorationError("method=ilvr is low-pass guidance for super-resolution (a Downsample operator); "
                                   "for masks use replacement, repaint or ddnm.")
        y = y.to(device)
        if self.method == "ddnm":
            net = NullSpaceProjection(denoiser.net, schedule, denoiser.objective, operator, y)
            denoiser = Denoiser(net, schedule, denoiser.objective, denoiser.clip_range)
        elif self.method == "guided":
            net = ReconstructionGuidance(denoiser.net, schedule, denoiser.objective, operator, y,
                                         self.reconstruction_weight)
            denoiser = Denoiser(net, schedule, denoiser.objective, denoiser.clip_range)
        chain = (_SigmaChain(sampler, denoiser, schedule) if isinstance(sampler, SigmaSampler)
                 else _DiscreteChain(sampler, denoiser, schedule))
        noise = x_T.to(device) if x_T is not None else torch.randn(shape, generator=generator, device=device)
        x = chain.start(noise)
        known = operator.A_pinv(y)
        path = self.path(chain.n)
        until = round(self.ilvr_until * chain.n)
        pairs = list(zip(path[:-1], path[1:]))
        for i in _track(range(len(pairs)), f"{self.method} ({chain.n} steps)", progress):
            level, target = pairs[i]
            if target < level:
                x = chain.jump(x, level, target, generator)
                continue
            x = chain.step(x, level, cond, generator)
            if target == chain.n:
                if self.method != "ilvr" or until == chain.n:
                    x = operator.project(x, y)
            elif self.method in ("replacement", "repaint", "guided") or (self.method == "ilvr" and target <= until):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = operator.project(x, operator.A(chain.noised(known, target, z)))
        return x
