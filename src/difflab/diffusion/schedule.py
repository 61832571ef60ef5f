"""Discrete-time noise schedules (beta_t, alpha_bar_t and everything derived from them).

Notation follows Ho et al. 2020 (DDPM): ``alpha_t = 1 - beta_t`` and
``alpha_bar_t = prod_{s<=t} alpha_s`` so that ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0,
(1 - alpha_bar_t) I)`` (DDPM eq. 4). Timesteps are integers ``0 .. T-1``; index ``t``
here is step ``t + 1`` of the paper.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BETA_SCHEDULES = ("linear", "cosine", "sigmoid")


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
    ) -> None:
        super().__init__()
        self.kind = kind
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.cosine_s = cosine_s
        self.sigmoid_start = sigmoid_start
        self.sigmoid_end = sigmoid_end
        self.sigmoid_tau = sigmoid_tau
        self.max_beta = max_beta
        betas = beta_schedule(
            kind,
            num_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            cosine_s=cosine_s,
            sigmoid_start=sigmoid_start,
            sigmoid_end=sigmoid_end,
            sigmoid_tau=sigmoid_tau,
            max_beta=max_beta,
        )
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas of the {kind!r} schedule must lie in (0, 1); check its arguments")

        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
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
        }

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
