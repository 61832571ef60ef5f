"""Samplers on Gaussian data, where the exact denoiser is known in closed form.

For data x_0 ~ N(mu, s^2 I) the marginal is q_t = N(sqrt(a) mu, (a s^2 + 1 - a) I) with
a = alpha_bar_t, so E[eps | x_t] = (x_t - sqrt(a) mu) sqrt(1 - a) / (a s^2 + 1 - a). Every
sampler step is then affine in x plus Gaussian noise, so the exact mean and std of the
discretised chain can also be propagated by hand (``chain_moments``), which separates
discretisation error (expected, e.g. DDPM with few steps is too narrow) from bugs.
"""

import dataclasses
import math

import pytest
import torch

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    Sampler,
    build_sampler,
    ddim_invert,
    timesteps,
)
from difflab.diffusion.schedule import NoiseSchedule, extract

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)  # data mean, one entry per dimension
S = 0.5  # data std
N = 10_000  # samples: standard error of the mean 0.005, of the std 0.0035
# Stated tolerances against the data distribution N(MU, S^2).
MEAN_TOL, STD_TOL = 0.03, 0.04
# Against the exact moments of the discretised chain (about 5 standard errors).
CHAIN_TOL = 0.02


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_net(schedule, objective="eps", mu=MU, s=S):
    """The exact network for data N(mu, s^2 I), predicting ``objective``."""

    def net(x, t, cond=None):
        a = extract(schedule.alpha_bar, t, x.ndim).double()
        marginal_var = a * s**2 + 1 - a
        xd = x.double()
        eps = (xd - a.sqrt() * mu) * (1 - a).sqrt() / marginal_var
        x0 = mu + a.sqrt() * s**2 * (xd - a.sqrt() * mu) / marginal_var
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[objective]
        return out.to(x.dtype)

    return net


def chain_moments(schedule, ts, mu, s, *, ddim_eta=None, variance="posterior"):
    """Mean and std after running the DDPM (``ddim_eta=None``) or DDIM chain on ts, from N(0, 1)."""
    alpha_bar = schedule.alpha_bar.double().tolist()
    ts = ts.tolist()
    mean, var = 0.0, 1.0
    for i, t in enumerate(ts):
        a = alpha_bar[t]
        a_prev = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        # x0_hat = c1 x + c0 and eps_hat = e1 x + e0 for the exact Gaussian denoiser.
        c1 = math.sqrt(a) * s**2 / (a * s**2 + 1 - a)
        c0 = mu * (1 - math.sqrt(a) * c1)
        e1 = (1 - math.sqrt(a) * c1) / math.sqrt(1 - a)
        e0 = -math.sqrt(a) * c0 / math.sqrt(1 - a)
        last = i + 1 == len(ts)
        if ddim_eta is None:  # x' ~ N(posterior mean at x0_hat, var)
            beta = 1 - a / a_prev
            k_x0, k_x = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            slope, offset = k_x0 * c1 + k_x, k_x0 * c0
            noise_var = 0.0 if last else (beta * (1 - a_prev) / (1 - a) if variance == "posterior" else beta)
        else:  # DDIM eq. 12 with sigma from eq. 16
            noise_var = ddim_eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            direction = math.sqrt(1 - a_prev - noise_var)
            slope, offset = math.sqrt(a_prev) * c1 + direction * e1, math.sqrt(a_prev) * c0 + direction * e0
        mean, var = slope * mean + offset, slope**2 * var + noise_var
    return mean, math.sqrt(var)


def check_gaussian(x, schedule, sampler, ts, **chain_kwargs):
    assert x.shape == (N, 2) and torch.isfinite(x).all()
    mean, std = x.double().mean(0), x.double().std(0)
    assert torch.allclose(mean, MU, atol=MEAN_TOL), (mean, std)
    assert torch.allclose(std, torch.full((2,), S, dtype=torch.float64), atol=STD_TOL), (mean, std)
    for d in range(2):
        chain_mean, chain_std = chain_moments(schedule, ts, MU[d].item(), S, **chain_kwargs)
        assert abs(mean[d].item() - chain_mean) < CHAIN_TOL, (d, mean, chain_mean)
        assert abs(std[d].item() - chain_std) < CHAIN_TOL, (d, std, chain_std)


# --------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(
    "num_timesteps, steps", [(1000, 1), (1000, 7), (1000, 50), (1000, 999), (1000, 1000), (10, 3), (37, 36)]
)
def test_timesteps_descending_unique_in_range(spacing, num_timesteps, steps):
    ts = timesteps(num_timesteps, steps, spacing)
    assert ts.dtype == torch.long and ts.shape == (steps,)
    assert bool((ts.diff() < 0).all())
    assert ts.min().item() >= 0 and ts.max().item() <= num_timesteps - 1
    if spacing == "leading":
        assert ts[-1].item() == 0 and ts[0].item() == (steps - 1) * (num_timesteps // steps)
    elif spacing == "trailing":
        assert ts[0].item() == num_timesteps - 1 and ts[-1].item() == round(num_timesteps / steps) - 1
    elif steps > 1:
        assert ts[0].item() == num_timesteps - 1 and ts[-1].item() == 0


def test_timesteps_known_values():
    assert timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert timesteps(1000, 10, "trailing").tolist() == list(range(999, 98, -100))
    assert timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timesteps(1000, 1000).tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_timesteps_bad_step_count(steps):
    with pytest.raises(ValueError, match=r"steps.*\[1, 1000\]"):
        timesteps(1000, steps)


def test_bad_spacing_and_sampler_settings():
    with pytest.raises(ValueError, match="'middle'.*leading, trailing, linspace"):
        timesteps(1000, 10, "middle")
    with pytest.raises(ValueError, match="spacing"):
        DDIMSampler(spacing="quadratic")
    with pytest.raises(ValueError, match="spacing"):
        DDPMSampler(spacing="uniform")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=1.5)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=-0.1)
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(steps=0)
    with pytest.raises(ValueError, match="variance.*posterior, beta"):
        DDPMSampler(variance="learned")
    schedule = NoiseSchedule("linear", num_timesteps=20)
    with pytest.raises(ValueError, match=r"steps.*\[1, 20\]"):
        DDIMSampler(steps=50).sample(Denoiser(gaussian_net(schedule), schedule), schedule, (2, 2))


def test_build_sampler_registry():
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler", "heun", "dpmpp", "pc", "consistency"}
    sampler = build_sampler("ddim", steps=20, eta=0.5)
    assert isinstance(sampler, DDIMSampler) and isinstance(sampler, Sampler)
    assert sampler.steps == 20 and sampler.eta == 0.5
    assert isinstance(build_sampler("ddpm", variance="beta"), DDPMSampler)
    with pytest.raises(ValueError, match="'lms'.*ddim, ddpm, dpmpp, euler, heun, pc"):
        build_sampler("lms")


def test_exactly_one_of_shape_and_x_T():
    schedule = NoiseSchedule("linear", num_timesteps=10)
    denoiser = Denoiser(gaussian_net(schedule), schedule)
    with pytest.raises(ValueError, match="shape.*x_T"):
        DDIMSampler(steps=5).sample(denoiser, schedule)
    with pytest.raises(ValueError, match="shape.*x_T"):
        DDIMSampler(steps=5).sample(denoiser, schedule, (2, 2), x_T=torch.zeros(2, 2))


# --------------------------------------------------------------------------- Gaussian data


@pytest.mark.parametrize("kind, variance", [("cosine", "posterior"), ("linear", "beta")])
def test_ddpm_full_chain_reproduces_gaussian(kind, variance):
    schedule = NoiseSchedule(kind, num_timesteps=1000)
    sampler = DDPMSampler(variance=variance, clip_denoised=False)
    x = sampler.sample(Denoiser(gaussian_net(schedule), schedule), schedule, (N, 2), generator=seeded(0))
    check_gaussian(x, schedule, sampler, timesteps(1000, 1000), variance=variance)


@pytest.mark.parametrize("variance, steps", [("posterior", 250), ("beta", 50)])
def test_respaced_ddpm_reproduces_gaussian(variance, steps):
    schedule = NoiseSchedule("linear", num_timesteps=1000)
    sampler = DDPMSampler(steps=steps, variance=variance, clip_denoised=False)
    x = sampler.sample(Denoiser(gaussian_net(schedule), schedule), schedule, (N, 2), generator=seeded(1))
    check_gaussian(x, schedule, sampler, timesteps(1000, steps), variance=variance)


def test_respaced_ddpm_follows_its_chain_with_few_steps():
    """With 20 steps beta-tilde is visibly too small (std ~0.39, not 0.5): the sampler must
    follow its own chain, not the data."""
    schedule = NoiseSchedule("linear", num_timesteps=1000)
    x = DDPMSampler(steps=20, clip_denoised=False).sample(
        Denoiser(gaussian_net(schedule), schedule), schedule, (N, 2), generator=seeded(2)
    )
    for d in range(2):
        chain_mean, chain_std = chain_moments(schedule, timesteps(1000, 20), MU[d].item(), S)
        assert chain_std < 0.42
        assert abs(x[:, d].double().mean().item() - chain_mean) < CHAIN_TOL
        assert abs(x[:, d].double().std().item() - chain_std) < CHAIN_TOL


@pytest.mark.parametrize(
    "kind, spacing", [("linear", "leading"), ("cosine", "trailing"), ("cosine", "linspace")]
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reproduces_gaussian(kind, spacing, eta):
    schedule = NoiseSchedule(kind, num_timesteps=1000)
    sampler = DDIMSampler(steps=100, eta=eta, spacing=spacing, clip_denoised=False)
    x = sampler.sample(Denoiser(gaussian_net(schedule), schedule), schedule, (N, 2), generator=seeded(3))
    check_gaussian(x, schedule, sampler, timesteps(1000, 100, spacing), ddim_eta=eta)


def test_ddim_eta0_is_deterministic_and_leaves_x_T_alone():
    schedule = NoiseSchedule("cosine", num_timesteps=1000)
    denoiser = Denoiser(gaussian_net(schedule), schedule)
    x_T = torch.randn(64, 2, generator=seeded(4))
    x_T_copy = x_T.clone()
    sampler = DDIMSampler(steps=30, eta=0.0, clip_denoised=False)
    first = sampler.sample(denoiser, schedule, x_T=x_T, generator=seeded(1))
    second = sampler.sample(denoiser, schedule, x_T=x_T, generator=seeded(2))
    assert torch.equal(first, second)
    assert torch.equal(x_T, x_T_copy)
    stochastic = DDIMSampler(steps=30, eta=1.0, clip_denoised=False)
    a = stochastic.sample(denoiser, schedule, x_T=x_T, generator=seeded(1))
    b = stochastic.sample(denoiser, schedule, x_T=x_T, generator=seeded(1))
    c = stochastic.sample(denoiser, schedule, x_T=x_T, generator=seeded(2))
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-2)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_eta1_equals_ddpm_on_the_same_timesteps(spacing):
    """DDIM eq. 16 with eta = 1 is DDPM's posterior step: same noise, same samples."""
    schedule = NoiseSchedule("linear", num_timesteps=1000)
    denoiser = Denoiser(gaussian_net(schedule), schedule)
    x_T = torch.randn(256, 2, generator=seeded(5))
    ddim = DDIMSampler(steps=40, eta=1.0, spacing=spacing, clip_denoised=False)
    ddpm = DDPMSampler(steps=40, spacing=spacing, clip_denoised=False)
    a = ddim.sample(denoiser, schedule, x_T=x_T, generator=seeded(6))
    b = ddpm.sample(denoiser, schedule, x_T=x_T, generator=seeded(6))
    assert torch.allclose(a, b, atol=1e-4)


def test_ddpm_steps_none_is_steps_T():
    schedule = NoiseSchedule("cosine", num_timesteps=50)
    denoiser = Denoiser(gaussian_net(schedule), schedule)
    a = DDPMSampler(clip_denoised=False).sample(
        denoiser, schedule, (8, 2), generator=seeded(0)
    )
    b = DDPMSampler(steps=50, clip_denoised=False).sample(
        denoiser, schedule, (8, 2), generator=seeded(0)
    )
    assert torch.equal(a, b)


@pytest.mark.parametrize("objective", ["x0", "v"])
def test_samplers_do_not_depend_on_the_objective(objective):
    schedule = NoiseSchedule("cosine", num_timesteps=1000)
    x_T = torch.randn(128, 2, generator=seeded(7))
    sampler = DDIMSampler(steps=25, clip_denoised=False)
    reference = sampler.sample(Denoiser(gaussian_net(schedule, "eps"), schedule, "eps"), schedule, x_T=x_T)
    wrapped = Denoiser(gaussian_net(schedule, objective), schedule, objective)
    other = sampler.sample(wrapped, schedule, x_T=x_T)
    assert torch.allclose(reference, other, atol=1e-3)


@pytest.mark.parametrize("kind, spacing", [("linear", "leading"), ("cosine", "trailing")])
def test_ddim_invert_then_sample_reconstructs(kind, spacing):
    schedule = NoiseSchedule(kind, num_timesteps=1000)
    denoiser = Denoiser(gaussian_net(schedule), schedule)
    x0 = MU.float() + S * torch.randn(2000, 2, generator=seeded(8))
    errors = {}
    for steps in (100, 200):
        latent = ddim_invert(denoiser, schedule, x0, steps, spacing=spacing)
        # The latent of Gaussian data is (close to) standard normal ...
        assert torch.allclose(latent.mean(0), torch.zeros(2), atol=0.1)
        assert torch.allclose(latent.std(0), torch.ones(2), atol=0.1)
        # ... and the deterministic sampler on the same timesteps maps it back.
        sampler = DDIMSampler(steps=steps, spacing=spacing, clip_denoised=False)
        errors[steps] = (sampler.sample(denoiser, schedule, x_T=latent) - x0).abs()
    # Inversion evaluates eps one point early, a first-order error: small, and it halves with the step.
    assert errors[200].mean().item() < 0.025 and errors[200].max().item() < 0.05, errors[200].max()
    assert errors[200].mean().item() < 0.65 * errors[100].mean().item()


# --------------------------------------------------------------------------- loop details


def test_trajectory_and_progress():
    schedule = NoiseSchedule("linear", num_timesteps=100)
    denoiser = Denoiser(gaussian_net(schedule), schedule)
    x_T = torch.randn(16, 2, generator=seeded(9))
    sampler = DDIMSampler(steps=12, clip_denoised=False)
    x, trajectory = sampler.sample(denoiser, schedule, x_T=x_T, return_trajectory=True, progress=True)
    assert len(trajectory) == 12
    assert all(step.device.type == "cpu" and step.shape == (16, 2) for step in trajectory)
    assert torch.equal(trajectory[-1], x)
    assert torch.equal(sampler.sample(denoiser, schedule, x_T=x_T), x)
    # Moving towards the data: spread shrinks from ~1 towards S.
    assert trajectory[0].std() > trajectory[-1].std()


@pytest.mark.parametrize(
    "sampler",
    [DDIMSampler(steps=20, eta=1.0), DDPMSampler(steps=20), DDPMSampler(steps=20, variance="beta")],
    ids=["ddim", "ddpm-posterior", "ddpm-beta"],
)
def test_last_step_lands_on_predicted_x0_without_noise(sampler):
    schedule = NoiseSchedule("linear", num_timesteps=1000)
    denoiser = Denoiser(gaussian_net(schedule), schedule)
    x, trajectory = sampler.sample(denoiser, schedule, (64, 2), generator=seeded(12), return_trajectory=True)
    last_t = sampler.timesteps_for(schedule)[-1].item()
    assert torch.allclose(x, denoiser.x0(trajectory[-2], last_t, clip=True), atol=1e-6)


@pytest.mark.parametrize("sampler", [DDIMSampler(steps=20), DDPMSampler(steps=20)], ids=["ddim", "ddpm"])
def test_clip_denoised_keeps_samples_in_range(sampler):
    schedule = NoiseSchedule("linear", num_timesteps=1000)
    far_mu = torch.tensor([3.0, -3.0], dtype=torch.float64)  # data far outside [-1, 1]
    denoiser = Denoiser(gaussian_net(schedule, mu=far_mu), schedule)
    clipped = sampler.sample(denoiser, schedule, (256, 2), generator=seeded(10))
    assert clipped.abs().max().item() <= 1.0 + 1e-6
    unclipped_sampler = dataclasses.replace(sampler, clip_denoised=False)
    unclipped = unclipped_sampler.sample(denoiser, schedule, (256, 2), generator=seeded(10))
    assert unclipped.abs().max().item() > 2.0


# --------------------------------------------------------------------------- denoiser


def test_denoiser_conversions_dtype_and_int_t():
    schedule = NoiseSchedule("cosine", num_timesteps=1000)
    x = torch.randn(5, 2, generator=seeded(11))
    t = torch.full((5,), 400)
    eps_denoiser = Denoiser(gaussian_net(schedule, "eps"), schedule, "eps")
    eps, x0 = eps_denoiser.predict(x, t)
    for objective in ["x0", "v"]:
        other = Denoiser(gaussian_net(schedule, objective), schedule, objective)
        assert torch.allclose(other.eps(x, t), eps, atol=1e-5)
        assert torch.allclose(other.x0(x, 400), x0, atol=1e-5)
        assert torch.allclose(other.v(x, t), eps_denoiser.v(x, 400), atol=1e-5)
    assert eps_denoiser.x0(x * 10, t, clip=True).abs().max() <= 1.0
    assert eps_denoiser.x0(x * 10, t).abs().max() > 1.0
    bf16 = Denoiser(lambda x, t, cond: gaussian_net(schedule)(x, t).to(torch.bfloat16), schedule, "eps")
    eps16, x016 = bf16.predict(x, 400)
    assert eps16.dtype == torch.float32 and x016.dtype == torch.float32
    assert torch.allclose(eps16, eps, atol=2e-2)
    with pytest.raises(ValueError, match="eps, x0, v"):
        Denoiser(gaussian_net(schedule), schedule, "score")


def test_denoiser_passes_t_and_cond_to_net():
    schedule = NoiseSchedule("linear", num_timesteps=10)
    calls = []

    def net(x, t, cond):
        calls.append((t, cond))
        return torch.zeros_like(x)

    Denoiser(net, schedule).predict(torch.zeros(3, 2), 7, cond="c")
    t, cond = calls[0]
    assert t.dtype == torch.long and t.tolist() == [7, 7, 7] and cond == "c"
    assert len(calls) == 1  # one network call for both eps and x0
