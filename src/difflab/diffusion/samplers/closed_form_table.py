"""Sampler error against the number of network calls, on data whose exact denoiser is known.

    python -m difflab.diffusion.samplers.closed_form_table [--samples 20000] [--schedule linear]

(about 1.5 minutes on one core).

The data is a Gaussian mixture with isotropic components, ``sum_k w_k N(m_k, s_k^2 I)``.
Its noisy marginal at VE noise level sigma is ``sum_k w_k N(m_k, (s_k^2 + sigma^2) I)``, so
E[x_0 | x_sigma] is closed form: the posterior responsibilities of the components times
each component's Gaussian posterior mean ``m_k + s_k^2 / (s_k^2 + sigma^2) (x - m_k)``.
``GaussianMixture.net`` turns that into a discrete-time network (eps, x0 or v objective)
that accepts integer or fractional timesteps, so every sampler can run on it; what is
left is the sampler's own discretisation error (plus Monte Carlo error, about
1 / sqrt(samples)). Prints a markdown table: error of the sample mean, covariance and
mixture weights against the exact ones, per sampler and network calls (NFE).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..denoiser import Denoiser
from ..parameterization import coefficients
from ..schedule import NoiseSchedule
from ..sigma import t_to_sigma
from .base import Sampler
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverPPSampler
from .karras import EulerSampler, HeunSampler
from .langevin import PCSampler


@dataclass
class GaussianMixture:
    """``sum_k weights[k] N(means[k], stds[k]^2 I)`` in ``means.shape[1]`` dimensions (float64)."""

    weights: torch.Tensor  # [K], sums to 1
    means: torch.Tensor  # [K, d]
    stds: torch.Tensor  # [K]

    @classmethod
    def default(cls, dim: int = 3) -> GaussianMixture:
        """Two unequal, well-separated components: weights 0.3 / 0.7, stds 0.35 / 0.5."""
        first = torch.tensor([1.5, 0.5, -0.5, 1.0], dtype=torch.float64)[:dim]
        second = torch.tensor([-1.0, -0.5, 0.5, -0.5], dtype=torch.float64)[:dim]
        return cls(
            weights=torch.tensor([0.3, 0.7], dtype=torch.float64),
            means=torch.stack([first, second]),
            stds=torch.tensor([0.35, 0.5], dtype=torch.float64),
        )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        """sum_k w_k (s_k^2 I + m_k m_k^T) - mu mu^T."""
        mu = self.mean()
        second = (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=torch.float64)
        second = second + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(mu, mu)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest component mean for each row of ``x``."""
        return torch.cdist(x.double(), self.means).argmin(dim=1)

    def posterior_mean(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """E[x_0 | x_0 + sigma n = x] for rows of ``x`` (float64); ``sigma`` scalar or [B, 1]."""
        x = x.double()
        var = self.stds**2 + torch.as_tensor(sigma, dtype=torch.float64) ** 2  # [K] or [B, K]
        sq_dist = torch.cdist(x, self.means) ** 2  # [B, K]
        log_resp = self.weights.log() - 0.5 * self.dim * var.log() - 0.5 * sq_dist / var
        resp = torch.softmax(log_resp, dim=1)  # posterior responsibilities
        shrink = (self.stds**2 / var).unsqueeze(-1)  # [K, 1] or [B, K, 1]
        component_means = self.means + shrink * (x.unsqueeze(1) - self.means)  # [B, K, d]
        return (resp.unsqueeze(-1) * component_means).sum(dim=1)

    def net(self, schedule: NoiseSchedule, objective: str = "eps"):
        """The exact network ``net(x_t, t, cond)`` with output ``objective`` for rows of x_t, on
        any path: ``t`` (integer or fractional) has the noise level ``sigma.t_to_sigma``, the
        input is ``c_in x_sigma`` and the output ``(x_0 - c_skip x_sigma) / c_out``
        (``parameterization``), x_0 the posterior mean.
        """

        def net(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
            sigma = t_to_sigma(schedule, t).to(x.device).reshape(-1, 1)
            c_in, c_skip, c_out = coefficients(schedule, objective, sigma)
            x_sigma = x.double() / c_in
            x0 = self.posterior_mean(x_sigma, sigma)
            return ((x0 - c_skip * x_sigma) / c_out).to(x.dtype)

        return net

    def errors(self, x: torch.Tensor) -> dict[str, float]:
        """Max abs error of the sample mean and covariance, and of the component fractions
        (nearest mean) against those of exact data; the last is compared with exact data
        labelled the same way, so overlapping components cost nothing."""
        x = x.double()
        fractions = torch.bincount(self.assign(x), minlength=len(self.weights)).double() / len(x)
        exact = self.assigned_fractions()
        return {
            "mean": (x.mean(0) - self.mean()).abs().max().item(),
            "cov": (torch.cov(x.T) - self.cov()).abs().max().item(),
            "weights": (fractions - exact).abs().max().item(),
        }

    def assigned_fractions(self, n: int = 400_000) -> torch.Tensor:
        """Fraction of exact data nearest to each component mean (Monte Carlo, fixed seed)."""
        labels = self.assign(self.sample(n, torch.Generator().manual_seed(12345)))
        return torch.bincount(labels, minlength=len(self.weights)).double() / n


def count_calls(net):
    """Wrap ``net`` so that ``wrapped.calls`` counts network evaluations."""

    def wrapped(x, t, cond=None):
        wrapped.calls += 1
        return net(x, t, cond)

    wrapped.calls = 0
    return wrapped


def table_samplers() -> dict[str, Sequence[Sampler]]:
    """The sampler settings of the table, a few step counts each."""
    return {
        "ddpm": [DDPMSampler(steps=s, clip_denoised=False) for s in (10, 25, 50, 100, 250, 1000)],
        "ddim": [DDIMSampler(steps=s, spacing="trailing", clip_denoised=False) for s in (5, 10, 20, 50, 100)],
        "euler": [EulerSampler(steps=s) for s in (5, 10, 20, 50, 100)],
        "heun": [HeunSampler(steps=s) for s in (3, 5, 10, 18, 50)],
        "heun (sigma_max 80)": [HeunSampler(steps=s, sigma_max=80.0) for s in (10, 18)],
        "dpm++": [DPMSolverPPSampler(steps=s) for s in (5, 10, 20, 50)],
        "dpm++ (sigma_max 80)": [DPMSolverPPSampler(steps=s, sigma_max=80.0) for s in (10, 20)],
        "dpm++ (linspace)": [DPMSolverPPSampler(steps=s, spacing="linspace") for s in (10, 20, 50)],
        "pc": [PCSampler(steps=s) for s in (50, 100, 250, 500, 1000)],
    }


def error_table(samples: int = 20_000, schedule_kind: str = "linear", dim: int = 3, seed: int = 0) -> str:
    """Markdown table of mean / covariance / weight errors vs NFE on the default mixture."""
    mixture = GaussianMixture.default(dim)
    schedule = NoiseSchedule(schedule_kind, num_timesteps=1000)
    floor = 1.0 / math.sqrt(samples)
    lines = [
        f"Mixture in {dim}-d, {schedule_kind} schedule (T = 1000), {samples} samples "
        f"(Monte Carlo error ~{floor:.3f}); errors are max abs over entries.",
        "",
        "| sampler | steps | NFE | mean err | cov err | weight err |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, samplers in table_samplers().items():
        for sampler in samplers:
            net = count_calls(mixture.net(schedule))
            x = sampler.sample(
                Denoiser(net, schedule), schedule, (samples, dim), generator=torch.Generator().manual_seed(seed)
            )
            err = mixture.errors(x)
            lines.append(
                f"| {name} | {sampler.steps} | {net.calls} | {err['mean']:.3f} | {err['cov']:.3f} | "
                f"{err['weights']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000, help="samples per sampler setting")
    parser.add_argument("--schedule", default="linear", help="beta schedule kind: linear | cosine | sigmoid")
    parser.add_argument("--dim", type=int, default=3, help="data dimension, 1..4")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial (and per-step) noise")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors, many steps: threads only add overhead
    print(error_table(args.samples, args.schedule, args.dim, args.seed))


if __name__ == "__main__":
    main()
