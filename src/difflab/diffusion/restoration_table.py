"""Restoration methods against the exact conditional distribution of Gaussian images.

    python -m difflab.diffusion.restoration_table [--samples 4000] [--steps 10 25 50 100]

(about a minute on one core).

For images x ~ N(mu, Sigma) and a linear measurement y = A x, the restorations should be
distributed as x | A x = y, which is Gaussian with

    mean = mu + Sigma A^T (A Sigma A^T)^+ (y - A mu),  cov = Sigma - Sigma A^T (A Sigma A^T)^+ A Sigma

(the Gaussian conditioning formula; for a mask it is the hole given the known pixels).
The noisy marginal at noise level sigma has E[x_0 | x_t] = mu + sqrt(a) Sigma (a Sigma +
(1 - a) I)^{-1} (x_t - sqrt(a) mu), a = 1 / (1 + sigma^2), so ``GaussianImage.net`` is the
exact network (eps, x0 or v objective, integer or fractional t): what is left is each
method's own error plus Monte Carlo error (about 1 / sqrt(samples)). Prints a markdown
table of the max abs error of the restorations' mean and covariance against the exact
conditional ones, per method, sampler and steps.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from .degradation import Downsample, Inpaint, Operator, make_keep
from .denoiser import Denoiser
from .restoration import Restoration
from .samplers import DDIMSampler, DDPMSampler, Sampler
from .schedule import NoiseSchedule
from .sigma import t_to_sigma


@dataclass
class GaussianImage:
    """Images ``[C, H, W]`` distributed as N(mean, cov) over their flattened pixels (float64)."""

    shape: tuple[int, int, int]
    mean: torch.Tensor  # [d]
    cov: torch.Tensor  # [d, d]

    @classmethod
    def smooth(cls, size: int = 4, std: float = 0.5, lengthscale: float = 1.5) -> GaussianImage:
        """One channel of ``size x size`` pixels with a squared-exponential covariance (nearby
        pixels correlated, so the known ones say much about the hole) and a ramp as mean."""
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        points = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()
        dist_sq = torch.cdist(points, points) ** 2
        cov = std**2 * torch.exp(-0.5 * dist_sq / lengthscale**2) + 1e-3 * torch.eye(size * size, dtype=torch.float64)
        mean = torch.linspace(-0.4, 0.4, size * size, dtype=torch.float64)
        return cls((1, size, size), mean, cov)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        chol = torch.linalg.cholesky(self.cov)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.mean + z @ chol.T).reshape(n, *self.shape)

    def net(self, schedule: NoiseSchedule, objective: str = "eps"):
        """The exact network ``net(x_t, t, cond)`` predicting ``objective``."""
        eigvals, eigvecs = torch.linalg.eigh(self.cov)

        def net(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
            sigma = t_to_sigma(schedule, t).double().reshape(-1, 1)
            a = 1.0 / (1.0 + sigma**2)  # [B, 1]
            xt = x.double().flatten(1)
            centred = (xt - a.sqrt() * self.mean) @ eigvecs  # in the eigenbasis
            gain = a.sqrt() * eigvals / (a * eigvals + 1.0 - a)  # [B, d]
            x0 = self.mean + (gain * centred) @ eigvecs.T
            eps = (xt - a.sqrt() * x0) / (1.0 - a).sqrt()
            out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1.0 - a).sqrt() * x0}[objective]
            return out.reshape(x.shape).to(x.dtype)

        return net

    def matrix(self, operator: Operator) -> torch.Tensor:
        """The operator as a matrix [m, d] (applied to each basis image)."""
        basis = torch.eye(self.dim, dtype=torch.float64).reshape(self.dim, *self.shape)
        return operator.A(basis).reshape(self.dim, -1).T

    def conditional(self, operator: Operator, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [d] and covariance [d, d] of x given A x = y (y: one measurement)."""
        a = self.matrix(operator)
        gain = self.cov @ a.T @ torch.linalg.pinv(a @ self.cov @ a.T)
        mean = self.mean + gain @ (y.double().flatten() - a @ self.mean)
        cov = self.cov - gain @ a @ self.cov
        return mean, cov

    def errors(self, samples: torch.Tensor, operator: Operator, y: torch.Tensor) -> dict[str, float]:
        """Max abs error of the sample mean and covariance against the exact conditional ones."""
        mean, cov = self.conditional(operator, y)
        flat = samples.double().flatten(1)
        return {"mean": (flat.mean(0) - mean).abs().max().item(),
                "cov": (torch.cov(flat.T) - cov).abs().max().item()}


def operators(size: int = 4) -> dict[str, Operator]:
    return {"inpaint-left": Inpaint(make_keep("left", size)), "superres-x2": Downsample(2)}


def measurement(image: GaussianImage, operator: Operator, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One true image drawn from the prior and its measurement, both float32 with a batch dim."""
    truth = image.sample(1, torch.Generator().manual_seed(seed)).float()
    return truth, operator.A(truth)


def run(image: GaussianImage, schedule: NoiseSchedule, operator: Operator, method: Restoration,
        sampler: Sampler, samples: int, seed: int = 1, objective: str = "eps") -> torch.Tensor:
    """``samples`` restorations of the one measurement of ``measurement``."""
    _, y = measurement(image, operator)
    denoiser = Denoiser(image.net(schedule, objective), schedule, objective)
    return method.restore(denoiser, schedule, sampler, operator, y.expand(samples, *y.shape[1:]),
                          (samples, *image.shape), generator=torch.Generator().manual_seed(seed))


METHOD_SETTINGS = {
    "replacement": Restoration("replacement"),
    "repaint (j5, r5)": Restoration("repaint", jump_length=5, jump_n_sample=5),
    "ddnm": Restoration("ddnm"),
    "ddnm (travel 5, r5)": Restoration("ddnm", travel_length=5, travel_repeat=5),
    "guided (w 8)": Restoration("guided", reconstruction_weight=8.0),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--schedule", default="linear")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    image = GaussianImage.smooth()
    schedule = NoiseSchedule(args.schedule, 1000)
    print(f"Gaussian 1x4x4 images (squared-exponential covariance, std 0.5), {args.samples} restorations of one "
          f"measurement, {args.schedule} schedule, exact eps network. Max abs error against the exact "
          f"conditional; Monte Carlo floor of the mean ~{0.5 / args.samples ** 0.5 * 3:.3f}.\n")
    print("| operator | method | sampler | steps | NFE | mean error | cov error | s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for op_name, operator in operators().items():
        for method_name, method in METHOD_SETTINGS.items():
            for sampler_name, make in (("ddpm", lambda s: DDPMSampler(steps=s, clip_denoised=False)),
                                       ("ddim", lambda s: DDIMSampler(steps=s, eta=0.0, clip_denoised=False))):
                for steps in args.steps:
                    if method.resamples and method.jump_length >= steps:
                        continue  # no room for a jump
                    start = time.perf_counter()
                    out = run(image, schedule, operator, method, make(steps), args.samples)
                    err = image.errors(out, operator, measurement(image, operator)[1])
                    print(f"| {op_name} | {method_name} | {sampler_name} | {steps} | "
                          f"{method.network_calls(steps)} | {err['mean']:.4f} | "
                          f"{err['cov']:.4f} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
