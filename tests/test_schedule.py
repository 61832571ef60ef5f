"""Noise schedules: values against their formulas, derived buffers, config, validation."""

import math
import subprocess
import sys

import pytest
import torch

from difflab.diffusion.schedule import BETA_SCHEDULES, NoiseSchedule, beta_schedule, extract

T = 1000


def cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17, written out independently of the module."""
    f = lambda v: torch.cos((v + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(u) / f(torch.zeros((), dtype=torch.float64))


def sigmoid_alpha_bar(u: torch.Tensor, start=-3.0, end=3.0, tau=1.0) -> torch.Tensor:
    sig = lambda z: 1 / (1 + torch.exp(-torch.as_tensor(z, dtype=torch.float64)))  # noqa: E731
    return (sig(end / tau) - sig((start + u * (end - start)) / tau)) / (sig(end / tau) - sig(start / tau))


def test_linear_endpoints_are_exact():
    betas = beta_schedule("linear", T, beta_start=1e-4, beta_end=0.02)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert betas[0].item() == 1e-4
    assert betas[-1].item() == 0.02
    assert torch.allclose(betas.diff(), torch.full((T - 1,), (0.02 - 1e-4) / (T - 1), dtype=torch.float64))


@pytest.mark.parametrize("kind", BETA_SCHEDULES)
def test_alpha_bar_strictly_decreasing_in_unit_interval(kind):
    schedule = NoiseSchedule(kind, num_timesteps=T)
    alpha_bar = schedule.alpha_bar
    assert alpha_bar.shape == (T,)
    assert bool((alpha_bar > 0).all()) and bool((alpha_bar <= 1).all())
    assert bool((alpha_bar.diff() < 0).all())
    assert bool((schedule.betas > 0).all()) and bool((schedule.betas <= schedule.max_beta + 1e-7).all())


def test_cosine_alpha_bar_matches_closed_formula():
    betas = beta_schedule("cosine", T)
    alpha_bar = torch.cumprod(1 - betas, 0)
    expected = cosine_alpha_bar(torch.arange(1, T + 1, dtype=torch.float64) / T)
    # Every step but the last (beta = 1, clipped to max_beta) is unclipped and telescopes.
    assert torch.allclose(alpha_bar[:-1], expected[:-1], rtol=1e-9, atol=0)
    assert betas[-1].item() == pytest.approx(0.999)
    float32_alpha_bar = NoiseSchedule("cosine").alpha_bar.double()
    assert torch.allclose(float32_alpha_bar[:-1], expected[:-1], rtol=1e-5, atol=1e-12)


def test_sigmoid_matches_formula_and_endpoints():
    start, end, tau = -3.0, 3.0, 0.7
    betas = beta_schedule("sigmoid", T, sigmoid_start=start, sigmoid_end=end, sigmoid_tau=tau)
    alpha_bar = torch.cumprod(1 - betas, 0)
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    expected = sigmoid_alpha_bar(u, start, end, tau)
    assert torch.allclose(alpha_bar[:-1], expected[:-1], rtol=1e-9, atol=1e-15)
    # alpha_bar(u=0) = 1: the first step only loses 1 - alpha_bar(1/T).
    assert alpha_bar[0].item() == pytest.approx(expected[0].item(), rel=1e-12)
    # alpha_bar(u=1) = 0: the last beta is 1 and gets clipped.
    assert betas[-1].item() == 0.999
    assert alpha_bar[-2].item() < 1e-3


def test_max_beta_clips():
    betas = beta_schedule("cosine", 20, max_beta=0.5)
    assert betas.max().item() == 0.5
    assert int((betas == 0.5).sum()) >= 2
    assert bool((beta_schedule("cosine", 20) <= 0.999).all())


def test_bad_kind_and_timesteps():
    with pytest.raises(ValueError, match="linear.*cosine.*sigmoid"):
        beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        beta_schedule("linear", 0)
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule("cosine", num_timesteps=0)


def test_buffers_are_float32_and_not_persistent():
    schedule = NoiseSchedule("cosine", num_timesteps=50)
    names = dict(schedule.named_buffers())
    for name in [
        "betas", "alphas", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar",
        "log_snr", "sigmas", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef_x0", "posterior_mean_coef_xt",
    ]:
        assert names[name].dtype == torch.float32 and names[name].shape == (50,)
    assert schedule.state_dict() == {}
    assert list(schedule.parameters()) == []
    assert schedule.num_timesteps == 50


def test_derived_buffers():
    schedule = NoiseSchedule("linear", num_timesteps=T)
    betas = beta_schedule("linear", T)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(schedule.alpha_bar.double(), alpha_bar, rtol=1e-6)
    assert schedule.alpha_bar_prev[0].item() == 1.0
    assert torch.equal(schedule.alpha_bar_prev[1:], schedule.alpha_bar[:-1])
    assert torch.allclose(schedule.log_snr.double(), torch.log(alpha_bar / (1 - alpha_bar)), rtol=1e-5)
    assert torch.allclose(schedule.sigmas.double() ** 2, (1 - alpha_bar) / alpha_bar, rtol=1e-5)
    assert torch.allclose(schedule.sqrt_alpha_bar**2 + schedule.sqrt_one_minus_alpha_bar**2, torch.ones(T))
    assert schedule.posterior_variance[0].item() == 0.0
    assert schedule.posterior_log_variance_clipped[0] == torch.log(schedule.posterior_variance[1])
    log_variance = schedule.posterior_log_variance_clipped
    assert torch.allclose(log_variance[1:], torch.log(schedule.posterior_variance[1:]))
    # beta-tilde <= beta (DDPM sec. 3.2: the two extreme choices of sigma_t^2).
    assert bool((schedule.posterior_variance <= schedule.betas).all())


def test_config_round_trip_and_attributes():
    schedule = NoiseSchedule("sigmoid", num_timesteps=64, sigmoid_tau=0.5, max_beta=0.99)
    config = schedule.config()
    assert config["kind"] == "sigmoid" and config["num_timesteps"] == 64 and config["sigmoid_tau"] == 0.5
    assert schedule.kind == "sigmoid" and schedule.max_beta == 0.99
    rebuilt = NoiseSchedule(**config)
    assert torch.equal(rebuilt.betas, schedule.betas)


def test_alpha_bar_at_and_extract():
    schedule = NoiseSchedule("linear", num_timesteps=10)
    values = schedule.alpha_bar_at(torch.tensor([-1, 0, 9]))
    assert values[0].item() == 1.0
    assert values[1] == schedule.alpha_bar[0] and values[2] == schedule.alpha_bar[9]
    assert schedule.alpha_bar_at(-1).item() == 1.0
    with pytest.raises(ValueError):
        schedule.alpha_bar_at(10)
    with pytest.raises(ValueError):
        schedule.alpha_bar_at(-2)
    gathered = extract(schedule.alpha_bar, torch.tensor([3, 7]), 4)
    assert gathered.shape == (2, 1, 1, 1)
    assert gathered[1, 0, 0, 0] == schedule.alpha_bar[7]


def test_single_timestep_schedule():
    schedule = NoiseSchedule("linear", num_timesteps=1, beta_start=0.5, beta_end=0.5)
    assert schedule.alpha_bar.tolist() == [0.5]
    assert torch.isfinite(schedule.posterior_log_variance_clipped).all()


def test_diffusion_package_imports_neither_lightning_nor_hydra():
    code = (
        "import sys, difflab.diffusion\n"
        "frameworks = ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in frameworks]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
