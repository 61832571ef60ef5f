"""Noise paths as discrete tables (beta_t, alpha_bar_t and everything derived from them).

Notation follows Ho et al. 2020 (DDPM): ``alpha_t = 1 - beta_t`` and
``alpha_bar_t = prod_{s<=t} alpha_s`` so that ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0,
(1 - alpha_bar_t) I)`` (DDPM eq. 4). Timesteps are integers ``0 .. T-1``; index ``t``
here is step ``t + 1`` of the paper.

Three families of path (``kind``), each seen by samplers as the same table of T levels:

- VP (``linear``, ``cosine``, ``sigmoid``): the discrete schedules above.
- ``flow``: the rectified-flow path ``x_t = (1 - t) x_0 + t eps`` (Liu et al. 2022; Lipman et
  al. 2022; Esser et al. 2024, SD3), t uniform over T levels between the t of ``sigma_min`` and
  of ``sigma_max`` (its VE noise level is sigma = t / (1 - t), so t = 1 is never reached).
- ``edm``: EDM's variance-exploding path ``x = x_0 + sigma eps`` (Karras et al. 2022), log sigma
  uniform over T levels from ``sigma_min`` to ``sigma_max`` (Song et al. 2021's VE SDE grid).

Every path is the VP path of ``alpha_bar = 1 / (1 + sigma^2)`` up to a rescaling of x (EDM
sec. 2, s(t)): ``x_t = s x_vp`` with ``s = sqrt(alpha^2 + sigma_t^2)``. Discrete samplers run on
the VP variable and sigma-space samplers on ``x / alpha``; only the network's input scale
(``input_scale``) and time input differ per path. On the two continuous paths the time input
is the fractional table index, an affine function of t (flow) or of log sigma (edm), so the
U-Net's time embedding sees the 0..T-1 range of the VP schedules; ``sigma_data`` is the data's
std that EDM's input scale and preconditioning assume.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BETA_SCHEDULES = ("linear", "cosine", "sigmoid")
CONTINUOUS_PATHS = ("flow", "edm")
PATHS = (*BETA_SCHEDULES, *CONTINUOUS_PATHS)


def continuous_sigmas(kind: str, num_timesteps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The T VE noise levels (float64, rising) of a continuous path's table (see the module doc)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"the {kind!r} path needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    if kind == "flow":
        t = torch.linspace(sigma_min / (1 + sigma_min), sigma_max / (1 + sigma_max), num_timesteps,
                           dtype=torch.float64)
        return t / (1 - t)
    if kind == "edm":
        return torch.linspace(math.log(sigma_min), math.log(sigma_max), num_timesteps, dtype=torch.float64).exp()
    raise ValueError(f"unknown continuous path {kind!r}; allowed: {', '.join(CONTINUOUS_PATHS)}")


def _betas_from_alpha_bar(alpha_bar: torch.Tensor, max_beta: float) -> torch.Tensor:
    """beta_t = 1 - alpha_bar(t+1) / alpha_bar(t) over a grid of T+1 points, clipped.

    Clipping at ``max_beta`` < 1 keeps the last step from being singular
    (Nichol & Dhariwal 2021, sec. 3.2).
    """
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(min=0.0, max=max_beta)


def beta_schedule(
    kind: str,
    num_timesteps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    sigmoid_start: float = -3.0,
    sigmoid_end: float = 3.0,
    sigmoid_tau: float = 1.0,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Return the betas of a named schedule as a float64 tensor of shape ``[num_timesteps]``.

    - ``"linear"``: betas evenly spaced from ``beta_start`` to ``beta_end``
      (Ho et al. 2020, sec. 4: 1e-4 .. 0.02 for T = 1000).
    - ``"cosine"``: ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)``
      (Nichol & Dhariwal 2021, eq. 17), betas from consecutive ratios clipped at ``max_beta``.
    - ``"sigmoid"``: ``alpha_bar(u) = (sig(end/tau) - sig((start + u (end - start)) / tau))
      / (sig(end/tau) - sig(start/tau))`` for ``u = t/T`` in [0, 1], so alpha_bar(0) = 1 and
      alpha_bar(1) = 0 (Jabri et al. 2022; Chen 2023, "On the importance of noise
      scheduling"), betas from consecutive ratios clipped at ``max_beta``.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    u = torch.linspace(0.0, 1.0, num_timesteps + 1, dtype=torch.float64)  # t/T for t = 0..T
    if kind == "cosine":
        f = torch.cos((u + cosine_s) / (1.0 + cosine_s) * math.pi / 2) ** 2
        return _betas_from_alpha_bar(f / f[0], max_beta)
    if kind == "sigmoid":
        if sigmoid_end <= sigmoid_start or sigmoid_tau <= 0:
            raise ValueError(
                "sigmoid schedule needs sigmoid_start < sigmoid_end and sigmoid_tau > 0, got "
                f"start={sigmoid_start}, end={sigmoid_end}, tau={sigmoid_tau}"
            )
        sig_start = torch.sigmoid(torch.tensor(sigmoid_start / sigmoid_tau, dtype=torch.float64))
        sig_end = torch.sigmoid(torch.tensor(sigmoid_end / sigmoid_tau, dtype=torch.float64))
        sig_u = torch.sigmoid((sigmoid_start + u * (sigmoid_end - sigmoid_start)) / sigmoid_tau)
        alpha_bar = (sig_end - sig_u) / (sig_end - sig_start)
        return _betas_from_alpha_bar(alpha_bar, max_beta)
    raise ValueError(f"unknown beta schedule kind {kind!r}; allowed kinds: {', '.join(BETA_SCHEDULES)}")


def extract(buf: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``buf[t]`` per sample and reshape to ``[B, 1, ..., 1]`` (``ndim`` dims in all)."""
    values = buf[t.to(buf.device)]
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


class NoiseSchedule(torch.nn.Module):
    """A discrete noise schedule and the per-timestep quantities derived from it.

    Everything is computed in float64 and stored as float32 buffers registered with
    ``persistent=False``: they are rebuilt from the constructor arguments (``config()``),
    so they are never trained, never written to a checkpoint and must not be EMA-averaged.

    Buffers (all shape ``[T]``):
      ``betas``, ``alphas`` (1 - beta), ``alpha_bar`` (cumulative product, DDPM eq. 4),
      ``alpha_bar_prev`` (alpha_bar at t-1, 1 at t=0), ``sqrt_alpha_bar``,
      ``sqrt_one_minus_alpha_bar``, ``log_snr`` (log alpha_bar / (1 - alpha_bar)),
      ``sigmas`` (sqrt((1 - alpha_bar) / alpha_bar): the VE / EDM noise level of
      ``x_t / sqrt(alpha_bar)``, Karras et al. 2022), ``posterior_variance`` (beta-tilde,
      DDPM eq. 7), ``posterior_log_variance_clipped`` (its log with the t=0 zero replaced by
      the t=1 value), ``posterior_mean_coef_x0`` and ``posterior_mean_coef_xt`` (the two
      coefficients of mu-tilde, DDPM eq. 7).
    """

    def __init__(
        self,
        kind: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        sigmoid_start: float = -3.0,
        sigmoid_end: float = 3.0,
        sigmoid_tau: float = 1.0,
        max_beta: float = 0.999,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float | None = 0.5,
    ) -> None:
        super().__init__()
        if kind not in PATHS:
            raise ValueError(f"unknown schedule kind {kind!r}; allowed kinds: {', '.join(PATHS)}")
        sigma_data = 0.5 if sigma_data is None else sigma_data  # None: EDM's 0.5 (difflab-train measures it)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.kind = kind
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.cosine_s = cosine_s
        self.sigmoid_start = sigmoid_start
        self.sigmoid_end = sigmoid_end
        self.sigmoid_tau = sigmoid_tau
        self.max_beta = max_beta
        if kind in CONTINUOUS_PATHS:
            if num_timesteps < 2:
                raise ValueError(f"num_timesteps must be >= 2 for the {kind!r} path, got {num_timesteps}")
            alpha_bar = 1.0 / (1.0 + continuous_sigmas(kind, num_timesteps, sigma_min, sigma_max) ** 2)
            self._register(1.0 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]]), alpha_bar)
        else:
            self._register(self._vp_betas(kind, num_timesteps))

    def _vp_betas(self, kind: str, num_timesteps: int) -> torch.Tensor:
        betas = beta_schedule(
            kind,
            num_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            cosine_s=self.cosine_s,
            sigmoid_start=self.sigmoid_start,
            sigmoid_end=self.sigmoid_end,
            sigmoid_tau=self.sigmoid_tau,
            max_beta=self.max_beta,
        )
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas of the {kind!r} schedule must lie in (0, 1); check its arguments")
        return betas

    def _register(self, betas: torch.Tensor, alpha_bar: torch.Tensor | None = None) -> None:
        """Derive every buffer from the betas (and the exact alpha_bar of a continuous path)."""
        num_timesteps = betas.shape[0]

        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0) if alpha_bar is None else alpha_bar
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        # DDPM eq. 7: beta-tilde_t and the two coefficients of mu-tilde_t(x_t, x_0).
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # beta-tilde_0 = 0; clip its log to the t=1 value as Ho et al. / Nichol & Dhariwal do.
        first = posterior_variance[1:2] if num_timesteps > 1 else betas[:1]
        posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
        derived = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
            "log_snr": alpha_bar.log() - torch.log1p(-alpha_bar),
            "sigmas": ((1.0 - alpha_bar) / alpha_bar).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef_x0": betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "posterior_mean_coef_xt": (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
        }
        for name, value in derived.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    @property
    def num_timesteps(self) -> int:
        """T, the number of discrete timesteps."""
        return self.betas.shape[0]

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``NoiseSchedule(**s.config())`` rebuilds ``s``."""
        return {
            "kind": self.kind,
            "num_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "cosine_s": self.cosine_s,
            "sigmoid_start": self.sigmoid_start,
            "sigmoid_end": self.sigmoid_end,
            "sigmoid_tau": self.sigmoid_tau,
            "max_beta": self.max_beta,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
        }

    @property
    def continuous(self) -> bool:
        """Whether this is a continuous path (flow, edm): any noise level in its range is a time."""
        return self.kind in CONTINUOUS_PATHS

    def input_scale(self, sigma: torch.Tensor | float) -> torch.Tensor | float:
        """The network input ``x_t = input_scale(sigma) * x_sigma`` of this path at VE level sigma:
        VP ``1 / sqrt(1 + sigma^2)`` (x_t itself), flow ``1 / (1 + sigma)`` (= 1 - t), edm EDM's
        ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` (Karras et al. 2022, Table 1)."""
        if self.kind == "flow":
            return 1.0 / (1.0 + sigma)
        if self.kind == "edm":
            return (sigma**2 + self.sigma_data**2) ** -0.5
        return (1.0 + sigma**2) ** -0.5

    def _path_ends(self) -> tuple[float, float]:
        """The ends of a continuous path's table in its own time: t (flow) or log sigma (edm)."""
        if self.kind == "flow":
            return self.sigma_min / (1 + self.sigma_min), self.sigma_max / (1 + self.sigma_max)
        if self.kind == "edm":
            return math.log(self.sigma_min), math.log(self.sigma_max)
        raise ValueError(f"this needs a continuous path (flow, edm), not {self.kind!r}")

    def continuous_sigma(self, index: torch.Tensor) -> torch.Tensor:
        """VE level(s) at fractional table index(es) of a continuous path, exact; the inverse of
        ``continuous_index``. Float64."""
        lo, hi = self._path_ends()
        position = lo + torch.as_tensor(index, dtype=torch.float64) / (self.num_timesteps - 1) * (hi - lo)
        return position / (1 - position) if self.kind == "flow" else position.exp()

    def continuous_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional table index of VE level(s) sigma on a continuous path, exact (flow: affine
        in t; edm: affine in log sigma), clamped to [0, T-1]. Float64, sigma's device."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        lo, hi = self._path_ends()
        own = sigma / (1 + sigma) if self.kind == "flow" else sigma.clamp(min=1e-300).log()
        last = self.num_timesteps - 1
        return ((own - lo) / (hi - lo) * last).clamp(0, last)

    def alpha_bar_at(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha_bar at integer timesteps ``t`` in ``[-1, T)``, with alpha_bar(-1) = 1.

        ``t = -1`` is the clean end of the chain: samplers use it as the "previous"
        timestep of their last step.
        """
        t = torch.as_tensor(t, dtype=torch.long, device=self.device)
        if bool(((t < -1) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_timesteps}), got {t.tolist()}")
        padded = torch.cat([self.alpha_bar.new_ones(1), self.alpha_bar])
        return padded[t + 1]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())
