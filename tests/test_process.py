"""Forward process and target conversions: moments of q_sample, round trips, posterior."""

import pytest
import torch

from difflab.diffusion.process import (
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior,
    q_sample,
    score_from_eps,
    v_from_x0_eps,
)
from difflab.diffusion.schedule import NoiseSchedule


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_q_sample_empirical_mean_and_variance():
    schedule = NoiseSchedule("linear")
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 100, 500, 999])
    x0 = torch.tensor([1.0, -0.5, 2.0, 0.7])[:, None].expand(4, 20000)
    xt = q_sample(schedule, x0, t, torch.randn(x0.shape, generator=g))
    alpha_bar = schedule.alpha_bar[t]
    # Standard errors: mean <= 1/sqrt(20000) = 0.007, variance <= sqrt(2/20000) = 0.01.
    assert torch.allclose(xt.mean(1), alpha_bar.sqrt() * x0[:, 0], atol=0.03)
    assert torch.allclose(xt.var(1), 1 - alpha_bar, atol=0.04)
    # t = 0 is almost clean, t = 999 almost pure noise.
    assert (xt[0] - x0[0]).abs().max() < 0.1
    assert xt[3].mean().abs() < 0.05


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_round_trips_eps_x0_v(kind):
    schedule = NoiseSchedule(kind)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 250, 500, 900, 998, 999])
    x0 = torch.randn(7, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(7, 3, 4, 4, generator=g, dtype=torch.float64)
    xt = q_sample(schedule, x0, t, eps)
    assert torch.allclose(predict_x0_from_eps(schedule, xt, t, eps), x0, atol=1e-5)
    assert torch.allclose(predict_eps_from_x0(schedule, xt, t, x0), eps, atol=1e-5)
    v = v_from_x0_eps(schedule, x0, t, eps)
    assert torch.allclose(predict_x0_from_v(schedule, xt, t, v), x0, atol=1e-5)
    assert torch.allclose(predict_eps_from_v(schedule, xt, t, v), eps, atol=1e-5)


def test_round_trip_float32_mid_range():
    schedule = NoiseSchedule("cosine")
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 900, (64,), generator=g)
    x0, eps = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    xt = q_sample(schedule, x0, t, eps)
    v = v_from_x0_eps(schedule, x0, t, eps)
    assert xt.dtype == torch.float32
    assert torch.allclose(predict_x0_from_v(schedule, xt, t, v), x0, atol=1e-5)
    x0_from_eps = predict_x0_from_eps(schedule, xt, t, eps)
    assert torch.allclose(predict_eps_from_x0(schedule, xt, t, x0_from_eps), eps, atol=1e-4)


def test_v_definition():
    schedule = NoiseSchedule("cosine")
    t = torch.tensor([300])
    x0, eps = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    a = schedule.alpha_bar[300]
    assert torch.allclose(v_from_x0_eps(schedule, x0, t, eps), a.sqrt() * -1.0 - (1 - a).sqrt() * 2.0)


def test_q_posterior_matches_bayes_rule():
    """Bayes' rule on q(x_{t-1} | x_0) = N(sqrt(a') x_0, 1 - a') and
    q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta), independent of DDPM eq. 7's closed form."""
    schedule = NoiseSchedule("cosine", num_timesteps=200)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([1, 5, 50, 150, 199])
    x0, xt = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    mean, variance, log_variance = q_posterior(schedule, x0, xt, t)
    beta = schedule.betas.double()[t][:, None]
    a_prev = schedule.alpha_bar_prev.double()[t][:, None]
    precision = 1 / (1 - a_prev) + (1 - beta) / beta
    expected_var = 1 / precision
    expected_mean = expected_var * (a_prev.sqrt() * x0 / (1 - a_prev) + (1 - beta).sqrt() * xt / beta)
    assert variance.shape == (5, 1)
    assert torch.allclose(variance.double(), expected_var, rtol=1e-4)
    assert torch.allclose(log_variance.double(), expected_var.log(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(mean.double(), expected_mean, atol=1e-4)


def test_q_posterior_at_t0_returns_x0():
    schedule = NoiseSchedule("linear")
    x0, xt = torch.randn(2, 3), torch.randn(2, 3)
    mean, variance, log_variance = q_posterior(schedule, x0, xt, torch.tensor([0, 0]))
    assert torch.allclose(mean, x0, atol=1e-6)
    assert bool((variance == 0).all())
    assert torch.isfinite(log_variance).all()


def test_score_from_eps_is_gaussian_score():
    """For data N(mu, s^2), q_t = N(sqrt(a) mu, a s^2 + 1 - a): the score is known in closed form."""
    schedule = NoiseSchedule("linear")
    mu, s = 0.3, 0.6
    t = torch.tensor([10, 400, 900])
    xt = torch.tensor([[0.1], [-1.2], [2.5]])
    a = schedule.alpha_bar[t][:, None]
    marginal_var = a * s**2 + 1 - a
    eps = (xt - a.sqrt() * mu) * (1 - a).sqrt() / marginal_var
    expected_score = -(xt - a.sqrt() * mu) / marginal_var
    assert torch.allclose(score_from_eps(schedule, xt, t, eps), expected_score, atol=1e-6)
