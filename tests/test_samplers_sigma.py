"""Sigma-space samplers (Euler, Heun, DPM-Solver++) and predictor-corrector on data whose
exact denoiser is closed form.

Data: the Gaussian of ``test_samplers`` (N(MU, S^2 I) in 2-d) and a two-component
Gaussian mixture in 3-d (``GaussianMixture.default``: weights 0.3 / 0.7, stds 0.35 / 0.5,
means 2.9 apart), whose E[x_0 | x_sigma] is the responsibility-weighted sum of the
components' Gaussian posterior means. The exact network accepts integer or fractional
timesteps, so the only error left is each sampler's discretisation error plus Monte
Carlo error. Deterministic samplers are also compared sample by sample with a fine
solution of the same ODE from the same noise (no Monte Carlo error there), and their
convergence order is checked.
"""

import math

import pytest
import torch
from test_samplers import MU, S, gaussian_net

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    EulerSampler,
    HeunSampler,
    LangevinSampler,
    PCSampler,
    Sampler,
    SigmaSampler,
    build_sampler,
    langevin_correct,
)
from difflab.diffusion.samplers.closed_form_table import GaussianMixture, count_calls, error_table
from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.sigma import SigmaDenoiser, karras_sigmas, sigma_range, sigma_to_t, t_to_sigma

MIXTURE = GaussianMixture.default(3)
GAUSSIAN = GaussianMixture(
    weights=torch.ones(1, dtype=torch.float64), means=MU[None].clone(), stds=torch.tensor([S], dtype=torch.float64)
)
N = 10_000  # samples for moment tests
# Stated tolerances against the exact data distribution, max abs over entries. Monte Carlo
# standard errors at N = 10,000: mixture mean ~0.012, covariance entries ~0.02, component
# fractions ~0.005; the rest is the sampler's discretisation error at its intended step
# count, measured on the linear schedule (see closed_form_table): largest for Heun with
# EDM's 18 steps (cov ~0.11), which these bounds leave room for.
MEAN_TOL, COV_TOL, WEIGHT_TOL = 0.05, 0.16, 0.02
# Per-sample mean abs distance to a 1000-step Heun solution of the same ODE (linear schedule).
ODE_TOL = {"euler": 0.025, "heun": 0.04, "dpm++": 0.02}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule("linear", num_timesteps=1000)


@pytest.fixture(scope="module")
def cosine():
    return NoiseSchedule("cosine", num_timesteps=1000)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mixture_denoiser(schedule, objective="eps", data=MIXTURE):
    return Denoiser(data.net(schedule, objective), schedule, objective)


def check_moments(x, data, mean_tol=MEAN_TOL, cov_tol=COV_TOL, weight_tol=WEIGHT_TOL):
    assert torch.isfinite(x).all()
    errors = data.errors(x)
    assert errors["mean"] < mean_tol, errors
    assert errors["cov"] < cov_tol, errors
    assert errors["weights"] < weight_tol, errors


# --------------------------------------------------------------------------- sigma helpers


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_sigma_table_round_trip(kind):
    schedule = NoiseSchedule(kind, num_timesteps=1000)
    lo, hi = sigma_range(schedule)
    table = schedule.sigmas.double()
    assert lo == table[0].item() and hi == table[-1].item()
    # Integer timesteps give the table exactly and map back to themselves.
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(t_to_sigma(schedule, t), table[t])
    assert torch.equal(sigma_to_t(schedule, table[t]), t.double())
    # Fractional timesteps interpolate log sigma and invert exactly.
    frac = torch.linspace(0, 999, 777, dtype=torch.float64)
    sig = t_to_sigma(schedule, frac)
    assert torch.allclose(sigma_to_t(schedule, sig), frac, atol=1e-9)
    assert bool((sig.diff() > 0).all())
    mid = t_to_sigma(schedule, torch.tensor(400.25, dtype=torch.float64))
    expected = (0.75 * table[400].log() + 0.25 * table[401].log()).exp()
    assert torch.allclose(mid, expected, rtol=1e-12)
    # Out of range: clamped to the ends.
    assert sigma_to_t(schedule, hi * 10).item() == 999 and sigma_to_t(schedule, lo / 10).item() == 0


def test_karras_sigmas_follow_eq5():
    sig = karras_sigmas(18, 0.002, 80.0, rho=7.0)
    assert sig.dtype == torch.float64 and sig.shape == (18,)
    assert math.isclose(sig[0].item(), 80.0, rel_tol=1e-12) and math.isclose(sig[-1].item(), 0.002, rel_tol=1e-12)
    assert bool((sig.diff() < 0).all())
    # sigma^(1/rho) is evenly spaced (EDM eq. 5); rho = 1 is evenly spaced sigma.
    assert torch.allclose(sig.pow(1 / 7).diff(), sig.pow(1 / 7).diff()[0].expand(17), rtol=1e-9)
    assert torch.allclose(karras_sigmas(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64))
    # Larger rho spends more steps at low noise.
    assert karras_sigmas(10, 0.01, 100, rho=7)[5] < karras_sigmas(10, 0.01, 100, rho=3)[5]
    assert karras_sigmas(1, 0.01, 100).tolist() == [100.0]
    for bad, match in [((0, 0.1, 1), "n must"), ((5, 0.1, 1, 0.0), "rho"), ((5, 2.0, 1.0), "sigma_min"),
                       ((5, 0.0, 1.0), "sigma_min"), ((2.5, 0.1, 1.0), "n must")]:
        with pytest.raises(ValueError, match=match):
            karras_sigmas(*bad)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_sigma_denoiser_matches_discrete_denoiser(cosine, objective):
    """At integer timesteps D(x_t / sqrt(a), sigma_t) is the discrete Denoiser's x0(x_t, t)."""
    denoiser = mixture_denoiser(cosine, objective)
    D = SigmaDenoiser(denoiser)
    reference = mixture_denoiser(cosine, "eps")
    x_t = torch.randn(64, 3, generator=seeded(0))
    for t in (0, 250, 700, 999):
        sigma = cosine.sigmas[t].item()
        x_sigma = x_t / cosine.sqrt_alpha_bar[t]
        expected = reference.x0(x_t, t)
        # float32 cancellation in x_sigma - sigma eps grows with sigma (2e4 at t = 999 here)
        atol = 1e-4 + 2e-6 * sigma
        assert torch.allclose(D(x_sigma, sigma), expected, atol=atol), t
        # and it is the exact posterior mean of the data
        assert torch.allclose(D(x_sigma, sigma).double(), MIXTURE.posterior_mean(x_sigma, sigma), atol=atol)
    # Per-sample sigmas [B] work too and agree with one call per level.
    sigmas = torch.tensor([0.05, 0.5, 5.0, 50.0]).repeat_interleave(16)
    x = torch.randn(64, 3, generator=seeded(1)) * (1 + sigmas[:, None])
    batched = D(x, sigmas)
    for k in range(4):
        rows = slice(16 * k, 16 * (k + 1))
        assert torch.allclose(batched[rows], D(x[rows], sigmas[16 * k].item()), atol=1e-5)
    assert D(x * 100, 1.0, clip=True).abs().max() <= 1.0


def test_sigma_denoiser_time_input_and_cond():
    schedule = NoiseSchedule("linear", num_timesteps=100)
    calls = []

    def net(x, t, cond):
        calls.append((x.clone(), t, cond))
        return torch.zeros_like(x)

    D = SigmaDenoiser(Denoiser(net, schedule))
    x = torch.ones(3, 2)
    table_sigma = schedule.sigmas[42].item()
    out = D(x, table_sigma, cond="c")
    _, t, cond = calls[-1]
    assert t.dtype == torch.long and t.tolist() == [42] * 3 and cond == "c"
    assert torch.equal(out, x)  # eps = 0: D = x_sigma
    D(x, t_to_sigma(schedule, 42.5).item())
    x_in, t, _ = calls[-1]
    assert t.dtype == torch.float32 and torch.allclose(t, torch.full((3,), 42.5))
    assert len(calls) == 2  # one network call per evaluation
    # Input scaling c_in = 1 / sqrt(1 + sigma^2) (EDM Table 1, VP).
    D(x, 3.0)
    assert torch.allclose(calls[-1][0], x / math.sqrt(10.0))


def test_gaussian_mixture_reuses_the_gaussian_predictor(linear):
    """With one component the mixture network is test_samplers' exact Gaussian network."""
    x = torch.randn(128, 2, generator=seeded(2)) * 2
    for t in (0, 10, 500, 999):
        tb = torch.full((128,), t)
        for objective in ("eps", "x0", "v"):
            ours = GAUSSIAN.net(linear, objective)(x, tb)
            theirs = gaussian_net(linear, objective)(x, tb)
            # gaussian_net's 1 - alpha_bar comes from a float32 alpha_bar (~1e-4 relative
            # at t = 0); ours from the float32 sigma table, which keeps that precision.
            assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-5), (t, objective)
    # Mixture moments agree with a large exact sample.
    big = MIXTURE.sample(200_000, seeded(3))
    assert torch.allclose(big.mean(0), MIXTURE.mean(), atol=0.01)
    assert torch.allclose(torch.cov(big.T), MIXTURE.cov(), atol=0.02)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EulerSampler(steps=0), r"steps.*>= 1"),
        (lambda: HeunSampler(steps=2.5), r"steps.*>= 1"),
        (lambda: EulerSampler(rho=0.0), r"rho must be a number > 0"),
        (lambda: HeunSampler(rho=-7), r"rho must be a number > 0"),
        (lambda: EulerSampler(s_churn=-1.0), r"s_churn must be a number >= 0"),
        (lambda: HeunSampler(s_noise=-0.5), r"s_noise must be a number >= 0"),
        (lambda: EulerSampler(s_tmin=2.0, s_tmax=1.0), r"s_tmax must be a number >= s_tmin"),
        (lambda: EulerSampler(sigma_min=0.0), r"sigma_min must be None or a number > 0"),
        (lambda: EulerSampler(sigma_min=5.0, sigma_max=1.0), r"sigma_min must be <= sigma_max"),
        (lambda: DPMSolverPPSampler(order=3), r"order must be one of 1, 2"),
        (lambda: DPMSolverPPSampler(order=0), r"order must be one of 1, 2"),
        (lambda: DPMSolverPPSampler(steps=0), r"steps.*>= 1"),
        (lambda: DPMSolverPPSampler(lower_order_final=False), r"lower_order_final must be True"),
        (lambda: DPMSolverPPSampler(spacing="quadratic"), r"spacing.*leading, trailing, linspace, logsnr, karras"),
        (lambda: DPMSolverPPSampler(sigma_max=-1.0), r"sigma_max must be None or a number > 0"),
        (lambda: DPMSolverPPSampler(spacing="trailing", sigma_max=80.0), r"sigma_min/sigma_max apply to the logsnr"),
        (lambda: PCSampler(snr=0.0), r"snr must be a number > 0"),
        (lambda: PCSampler(snr=-0.16), r"snr must be a number > 0"),
        (lambda: PCSampler(corrector_steps=-1), r"corrector_steps must be an integer >= 0"),
        (lambda: PCSampler(steps=0), r"steps.*>= 1"),
        (lambda: PCSampler(predictor="euler_maruyama"), r"predictor.*reverse_diffusion, ancestral"),
        (lambda: PCSampler(spacing="middle"), r"spacing.*leading, trailing, linspace"),
    ],
)
def test_bad_settings_name_the_setting(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_step_counts_beyond_the_schedule(linear):
    small = NoiseSchedule("linear", num_timesteps=20)
    denoiser = mixture_denoiser(small)
    for sampler in (DPMSolverPPSampler(steps=50, spacing="trailing"), PCSampler(steps=50)):
        with pytest.raises(ValueError, match=r"steps.*\[1, 20\]"):
            sampler.sample(denoiser, small, (2, 3))
    # Continuous grids are not bounded by T.
    assert DPMSolverPPSampler(steps=50).sample(denoiser, small, (2, 3)).shape == (2, 3)
    assert EulerSampler(steps=50).sample(denoiser, small, (2, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="shape.*x_T"):
        HeunSampler().sample(mixture_denoiser(linear), linear)
    with pytest.raises(ValueError, match="sigma_min.*<= sigma_max"):
        EulerSampler(sigma_min=200.0).sample(mixture_denoiser(linear), linear, (2, 3))


def test_registry_builds_every_sampler():
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler", "heun", "dpmpp", "pc", "consistency"}
    for name, cls in SAMPLERS.items():
        sampler = build_sampler(name)
        assert type(sampler) is cls and isinstance(sampler, Sampler)
    assert build_sampler("heun", steps=7, s_churn=10.0).steps == 7
    assert build_sampler("dpmpp", order=1).order == 1
    assert build_sampler("pc", snr=0.1).snr == 0.1
    assert LangevinSampler is PCSampler
    assert all(isinstance(build_sampler(n), SigmaSampler) for n in ("euler", "heun", "dpmpp"))
    with pytest.raises(ValueError, match="'lms'.*ddim, ddpm, dpmpp, euler, heun, pc"):
        build_sampler("lms")
    with pytest.raises(NotImplementedError, match="sigma"):
        EulerSampler().step(None, torch.zeros(1), 0, 0.5, 1.0, last=True)


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize(
    "sampler",
    [EulerSampler(steps=100), HeunSampler(steps=18), DPMSolverPPSampler(steps=20), PCSampler(steps=500)],
    ids=["euler-100", "heun-18", "dpm++-20", "pc-500"],
)
@pytest.mark.parametrize("data", ["gaussian", "mixture"])
def test_sampler_reproduces_the_data(linear, sampler, data):
    dist, n = (GAUSSIAN, N) if data == "gaussian" else (MIXTURE, N)
    if isinstance(sampler, PCSampler):
        n = 4000  # 999 network calls; errors of the mean/cov grow by sqrt(2.5), bounds still hold
    x = sampler.sample(mixture_denoiser(linear, data=dist), linear, (n, dist.dim), generator=seeded(4))
    assert x.shape == (n, dist.dim) and x.dtype == torch.float32
    check_moments(x, dist)


@pytest.mark.parametrize(
    "sampler", [HeunSampler(steps=18, sigma_max=80.0), DPMSolverPPSampler(steps=20, sigma_max=80.0)],
    ids=["heun-18", "dpm++-20"],
)
def test_sigma_max_80_on_the_cosine_schedule(cosine, sampler):
    """The cosine schedule's sigma(T-1) is ~2e4; starting at EDM's sigma_max = 80 instead
    costs nothing (x_T sigma_max is then still ~N(0, sigma^2 + data var)) and fixes Heun-18
    (covariance error 0.86 from sigma(T-1), 0.07 from 80, see closed_form_table)."""
    x = sampler.sample(mixture_denoiser(cosine), cosine, (N, 3), generator=seeded(4))
    check_moments(x, MIXTURE)


def test_samplers_with_churn_reproduce_the_data(linear):
    """EDM Alg. 2's churn (stochastic) keeps the distribution and uses the generator.

    gamma = s_churn / N per step, so a fixed s_churn is a fixed total amount of churn; the
    larger steps from (1 + gamma) sigma add discretisation error, hence 36 Heun steps here.
    """
    denoiser = mixture_denoiser(linear)
    for sampler in (HeunSampler(steps=36, s_churn=5.0, s_tmin=0.05, s_tmax=50.0),
                    EulerSampler(steps=200, s_churn=10.0)):
        x = sampler.sample(denoiser, linear, (N, 3), generator=seeded(5))
        check_moments(x, MIXTURE)
    x_T = torch.randn(256, 3, generator=seeded(6))
    churned = HeunSampler(steps=18, s_churn=10.0)
    a = churned.sample(denoiser, linear, x_T=x_T, generator=seeded(1))
    b = churned.sample(denoiser, linear, x_T=x_T, generator=seeded(1))
    c = churned.sample(denoiser, linear, x_T=x_T, generator=seeded(2))
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-2)
    # A churn window that contains none of the noise levels changes nothing.
    no_window = HeunSampler(steps=18, s_churn=10.0, s_tmin=1000.0, s_tmax=2000.0)
    assert torch.equal(no_window.sample(denoiser, linear, x_T=x_T, generator=seeded(1)),
                       HeunSampler(steps=18).sample(denoiser, linear, x_T=x_T))


def test_churn_raises_the_noise_level_as_edm_alg2():
    """sigma_hat = (1 + gamma) sigma, gamma = min(s_churn / N, sqrt(2) - 1), inside [s_tmin, s_tmax];
    x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) z."""
    x = torch.zeros(1000, 2)
    z = torch.randn(1000, 2, generator=seeded(17))
    small = EulerSampler(steps=10, s_churn=2.0, s_noise=1.007, s_tmin=0.5, s_tmax=5.0)
    x_hat, sigma_hat = small.churn(x, 2.0, seeded(17))
    assert math.isclose(sigma_hat, 2.0 * 1.2)
    assert torch.allclose(x_hat, 1.007 * math.sqrt(2.4**2 - 4.0) * z)
    capped = HeunSampler(steps=10, s_churn=100.0)
    assert math.isclose(capped.churn(x, 2.0, seeded(17))[1], 2.0 * math.sqrt(2.0))
    for sigma in (0.4, 6.0):  # outside the window: untouched
        assert small.churn(x, sigma, seeded(17)) == (x, sigma)


# --------------------------------------------------------------------------- ODE accuracy


@pytest.fixture(scope="module")
def ode_reference(linear):
    """A fine (1000-step Heun) solution of the probability-flow ODE from fixed noise."""
    x_T = torch.randn(2000, 3, generator=seeded(7), dtype=torch.float64)
    return x_T, HeunSampler(steps=1000).sample(mixture_denoiser(linear), linear, x_T=x_T)


@pytest.mark.parametrize(
    "name, sampler",
    [("euler", EulerSampler(steps=100)), ("heun", HeunSampler(steps=18)), ("dpm++", DPMSolverPPSampler(steps=20))],
)
def test_ode_samplers_solve_the_ode_and_are_deterministic(linear, ode_reference, name, sampler):
    x_T, reference = ode_reference
    denoiser = mixture_denoiser(linear)
    x_T_copy = x_T.clone()
    first = sampler.sample(denoiser, linear, x_T=x_T, generator=seeded(1))
    second = sampler.sample(denoiser, linear, x_T=x_T, generator=seeded(2))
    assert torch.equal(first, second) and torch.equal(x_T, x_T_copy)
    error = (first - reference).abs().mean().item()
    assert error < ODE_TOL[name], error


def _errors(make, steps, linear, ode_reference):
    x_T, reference = ode_reference
    return [(make(n).sample(mixture_denoiser(linear), linear, x_T=x_T) - reference).abs().mean().item()
            for n in steps]


def test_convergence_orders(linear, ode_reference):
    """Doubling the steps halves Euler's and first-order DPM-Solver's error and quarters
    Heun's and DPM-Solver++(2M)'s (asymptotically): the methods have the order they claim."""
    euler = _errors(lambda n: EulerSampler(steps=n), (50, 100), linear, ode_reference)
    dpm1 = _errors(lambda n: DPMSolverPPSampler(steps=n, order=1), (20, 40), linear, ode_reference)
    heun = _errors(lambda n: HeunSampler(steps=n), (36, 72), linear, ode_reference)
    dpm2 = _errors(lambda n: DPMSolverPPSampler(steps=n), (20, 40), linear, ode_reference)
    assert 1.7 < euler[0] / euler[1] < 2.3, euler
    assert 1.7 < dpm1[0] / dpm1[1] < 2.3, dpm1
    assert heun[0] / heun[1] > 3.3, heun
    assert dpm2[0] / dpm2[1] > 3.3, dpm2
    assert dpm2[0] < 0.3 * dpm1[0]  # and second order pays off at 20 steps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_first_order_dpm_solver_is_ddim(linear, spacing):
    """DPM-Solver++ order 1 on DDIM's timestep array is DDIM (eta = 0), from the same x_T.

    (On the cosine schedule, sigma(T-1) = 2e4 and the float32 tables of alpha_bar and sigma
    disagree by ~1e-3 in x0 at the first step, so the check uses the linear schedule.)
    """
    denoiser = mixture_denoiser(linear)
    x_T = torch.randn(512, 3, generator=seeded(8))
    ddim = DDIMSampler(steps=25, spacing=spacing, clip_denoised=False).sample(denoiser, linear, x_T=x_T)
    dpm = DPMSolverPPSampler(steps=25, order=1, spacing=spacing).sample(denoiser, linear, x_T=x_T)
    assert torch.allclose(dpm, ddim, atol=1e-4), (dpm - ddim).abs().max()


@pytest.mark.parametrize(
    "sampler",
    [EulerSampler(steps=30), HeunSampler(steps=10, s_churn=5.0), DPMSolverPPSampler(steps=15),
     DPMSolverPPSampler(steps=15, spacing="karras"), PCSampler(steps=100, corrector_steps=2)],
    ids=["euler", "heun-churn", "dpm++", "dpm++-karras", "pc"],
)
@pytest.mark.parametrize("objective", ["x0", "v"])
def test_samplers_do_not_depend_on_the_objective(cosine, sampler, objective):
    x_T = torch.randn(256, 3, generator=seeded(9))
    reference = sampler.sample(mixture_denoiser(cosine, "eps"), cosine, x_T=x_T, generator=seeded(3))
    other = sampler.sample(mixture_denoiser(cosine, objective), cosine, x_T=x_T, generator=seeded(3))
    assert torch.allclose(reference, other, atol=2e-3), (reference - other).abs().max()


# --------------------------------------------------------------------------- loop details


def test_network_calls_grid_and_last_steps(linear):
    data_net = MIXTURE.net(linear)
    seen = []

    def net(x, t, cond=None):
        seen.append(t.clone())
        return data_net(x, t, cond)

    denoiser = Denoiser(count_calls(net), linear)
    x_T = torch.randn(32, 3, generator=seeded(10))
    lo, hi = sigma_range(linear)

    euler = EulerSampler(steps=12, sigma_max=hi)  # from the schedule's own top (default: EDM's 80)
    x, trajectory = euler.sample(denoiser, linear, x_T=x_T, return_trajectory=True)
    assert denoiser.net.calls == 12 and len(trajectory) == 12 and torch.equal(trajectory[-1], x)
    # The first call sees x = sigma_max x_T through c_in, at the last timestep.
    assert seen[0].dtype == torch.long and seen[0].tolist() == [999] * 32
    assert torch.allclose(euler.sigmas_for(linear)[:-1], karras_sigmas(12, lo, hi))
    assert torch.allclose(euler.timesteps_for(linear), sigma_to_t(linear, karras_sigmas(12, lo, hi)))
    assert seen[1].dtype == torch.float32  # fractional timesteps between table entries

    denoiser.net.calls = 0
    heun = HeunSampler(steps=12, sigma_max=hi)
    x, trajectory = heun.sample(denoiser, linear, x_T=x_T, return_trajectory=True)
    assert denoiser.net.calls == 2 * 12 - 1
    # Heun's last step (onto sigma = 0) is an Euler step, which there returns D.
    last_sigma = heun.sigmas_for(linear)[-2].item()
    x_before = trajectory[-2] * math.sqrt(1 + last_sigma**2)  # the trajectory holds x_sigma / sqrt(1 + sigma^2)
    assert torch.allclose(x, SigmaDenoiser(denoiser)(x_before, last_sigma), atol=1e-5)
    # The trajectory moves from ~N(0, I) (VP scale) towards the data.
    assert abs(trajectory[0].std().item() - 1.0) < 0.3

    seen.clear()
    denoiser.net.calls = 0
    dpm = DPMSolverPPSampler(steps=10, spacing="trailing")
    dpm.sample(denoiser, linear, x_T=x_T)
    assert denoiser.net.calls == 10
    assert all(t.dtype == torch.long for t in seen)
    assert [t[0].item() for t in seen] == dpm.timesteps_for(linear).tolist()

    denoiser.net.calls = 0
    pc = PCSampler(steps=20, corrector_steps=3)
    x, trajectory = pc.sample(denoiser, linear, x_T=x_T, return_trajectory=True, progress=True)
    assert denoiser.net.calls == 20 + 3 * 19 and len(trajectory) == 20 and torch.equal(trajectory[-1], x)


def test_dpm_solver_grids(linear):
    lo, hi = sigma_range(linear)
    logsnr = DPMSolverPPSampler(steps=9).sigmas_for(linear)  # from EDM's 80 (linear's own top is ~157)
    assert hi > 80 and logsnr[-1] == 0 and math.isclose(logsnr[0], 80.0) and math.isclose(logsnr[-2], lo)
    assert torch.allclose(logsnr[:-1].log().diff(), logsnr[:-1].log().diff()[0].expand(8))  # r = 1
    karras = DPMSolverPPSampler(steps=9, spacing="karras", sigma_max=hi).sigmas_for(linear)
    assert torch.allclose(karras[:-1], karras_sigmas(9, lo, hi))
    capped = DPMSolverPPSampler(steps=9, sigma_max=80.0, sigma_min=0.02).sigmas_for(linear)
    assert capped[0] == 80.0 and capped[-2] == 0.02 and capped[-1] == 0
    with pytest.raises(ValueError, match="sigma_min.*<= sigma_max"):
        DPMSolverPPSampler(sigma_min=500.0).sigmas_for(linear)
    linspace = DPMSolverPPSampler(steps=9, spacing="linspace")
    ts = linspace.timesteps_for(linear)
    assert ts.dtype == torch.long and ts.tolist() == [999, 874, 749, 624, 500, 375, 250, 125, 0]
    assert torch.equal(linspace.sigmas_for(linear)[:-1], linear.sigmas.double()[ts])


def test_ancestral_pc_without_corrector_is_ddpm(linear):
    """Song et al.'s ancestral predictor for VP is DDPM with variance beta: same noise, same samples."""
    denoiser = mixture_denoiser(linear)
    x_T = torch.randn(512, 3, generator=seeded(11))
    for spacing in ("leading", "trailing"):
        pc = PCSampler(steps=40, corrector_steps=0, predictor="ancestral", spacing=spacing)
        ddpm = DDPMSampler(steps=40, variance="beta", clip_denoised=False, spacing=spacing)
        a = pc.sample(denoiser, linear, x_T=x_T, generator=seeded(12))
        b = ddpm.sample(denoiser, linear, x_T=x_T, generator=seeded(12))
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # The reverse-diffusion predictor differs from it at second order in beta only.
    rd = PCSampler(steps=1000, corrector_steps=0).sample(denoiser, linear, x_T=x_T, generator=seeded(12))
    anc = PCSampler(steps=1000, corrector_steps=0, predictor="ancestral").sample(
        denoiser, linear, x_T=x_T, generator=seeded(12))
    assert (rd - anc).abs().mean() < 0.01


def test_langevin_corrector_targets_q_t(linear):
    """The corrector keeps exact samples of q_t exact and pulls wrong ones to q_t."""
    t = 300
    a = linear.alpha_bar[t].item()
    exact_mean = math.sqrt(a) * MIXTURE.mean()
    exact_cov = a * MIXTURE.cov() + (1 - a) * torch.eye(3, dtype=torch.float64)
    denoiser = mixture_denoiser(linear)
    g = seeded(13)
    noise = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    x_t = math.sqrt(a) * MIXTURE.sample(4000, g) + math.sqrt(1 - a) * noise
    kept = langevin_correct(denoiser, x_t.float(), t, snr=0.16, steps=100, generator=g).double()
    assert (kept.mean(0) - exact_mean).abs().max() < 0.05
    assert (torch.cov(kept.T) - exact_cov).abs().max() < 0.08
    assert (kept - x_t).abs().mean() > 0.1  # it did move the samples
    wrong = torch.randn(4000, 3, generator=g) * 2.0 + 1.0  # covariance error ~3 at the start
    pulled = langevin_correct(denoiser, wrong, t, snr=0.16, steps=400, generator=g).double()
    assert (pulled.mean(0) - exact_mean).abs().max() < 0.06
    assert (torch.cov(pulled.T) - exact_cov).abs().max() < 0.08
    with pytest.raises(ValueError, match="snr"):
        langevin_correct(denoiser, wrong, t, snr=0.0)


def test_langevin_step_follows_the_snr_rule(linear):
    """One corrector step is x + eps g + sqrt(2 eps) z with eps = 2 alpha_t (snr ||z|| / ||g||)^2
    (Song et al. 2021, Alg. 5; norms per sample, averaged over the batch)."""
    t, snr = 400, 0.2
    denoiser = mixture_denoiser(linear)
    x = torch.randn(256, 3, generator=seeded(15))
    stepped = langevin_correct(denoiser, x, t, snr=snr, steps=1, generator=seeded(16))
    z = torch.randn(256, 3, generator=seeded(16))
    g = -denoiser.eps(x, t).double() / linear.sqrt_one_minus_alpha_bar[t].item()
    step = 2 * linear.alphas[t].item() * (snr * z.norm(dim=1).mean() / g.norm(dim=1).mean()) ** 2
    assert torch.allclose(stepped.double(), x + step * g + (2 * step).sqrt() * z, atol=1e-5)
    # A network that predicts eps = 0 (zero-initialised output layer) gives no step, not NaN.
    zero = Denoiser(lambda x, t, cond: torch.zeros_like(x), linear)
    assert torch.equal(langevin_correct(zero, x, t, generator=seeded(16)), x)
    assert torch.isfinite(PCSampler(steps=5).sample(zero, linear, (4, 3), generator=seeded(0))).all()


def test_corrector_improves_a_coarse_predictor(linear):
    """With 50 predictor steps the reverse-diffusion chain is visibly off; the corrector fixes most of it."""
    denoiser = mixture_denoiser(linear)
    plain = PCSampler(steps=50, corrector_steps=0).sample(denoiser, linear, (N, 3), generator=seeded(14))
    corrected = PCSampler(steps=50, corrector_steps=2).sample(denoiser, linear, (N, 3), generator=seeded(14))
    plain_err, corrected_err = MIXTURE.errors(plain)["cov"], MIXTURE.errors(corrected)["cov"]
    assert corrected_err < 0.5 * plain_err, (plain_err, corrected_err)
    check_moments(corrected, MIXTURE)


def test_error_table_prints_markdown(monkeypatch):
    import difflab.diffusion.samplers.closed_form_table as table

    monkeypatch.setattr(table, "table_samplers", lambda: {"heun": [HeunSampler(steps=3)], "pc": [PCSampler(steps=5)]})
    text = error_table(samples=200, dim=2)
    lines = text.splitlines()
    assert lines[2] == "| sampler | steps | NFE | mean err | cov err | weight err |"
    assert lines[4].startswith("| heun | 3 | 5 |") and lines[5].startswith("| pc | 5 | 9 |")
