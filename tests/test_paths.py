"""One training core over four choices: paths (VP, flow, edm), outputs, densities, weightings.

The proofs of issue 13's first two points: DDIM (eta = 0) on the rectified-flow path is Euler on
its ODE; the closed-form Gaussian-mixture sampler tests pass on the new paths with every output;
each weighting is its stated weight on the x_0 error (within 1e-6), and agrees with diffusers'
Min-SNR and k-diffusion's soft-min-SNR / EDM formulas; logit-normal in t is log-normal in sigma on
the flow path (Kolmogorov-Smirnov).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.density import Last, LogitNormal, LogNormal, Uniform, levels_of
from difflab.diffusion.losses import diffusion_loss, min_snr_weight
from difflab.diffusion.parameterization import coefficients
from difflab.diffusion.samplers import DDIMSampler, DPMSolverPPSampler, EulerSampler, HeunSampler, build_sampler
from difflab.diffusion.samplers.closed_form_table import GaussianMixture
from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.sigma import SigmaDenoiser, sigma_to_t, t_to_sigma
from difflab.diffusion.weighting import EDMWeight, MinSNR, P2, Simplified, SoftMinSNR, Uncertainty

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

MIXTURE = GaussianMixture.default(3)
FLOW, EDM, COSINE = NoiseSchedule("flow"), NoiseSchedule("edm", sigma_data=0.6), NoiseSchedule("cosine")
PAIRS = [(FLOW, "velocity"), (FLOW, "eps"), (FLOW, "v"), (FLOW, "edm"), (EDM, "edm"), (EDM, "x0"), (EDM, "eps"),
         (COSINE, "edm")]
IDS = [f"{s.kind}-{o}" for s, o in PAIRS]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- paths

def test_flow_table_is_the_rectified_flow_path():
    t = FLOW.sigmas.double() / (1 + FLOW.sigmas.double())  # sigma = t / (1 - t)
    assert torch.allclose(t.diff(), t.diff()[0].expand(999), rtol=1e-4)  # t uniform over the table
    assert math.isclose(FLOW.sigmas[0].item(), 0.002, rel_tol=1e-6) and math.isclose(FLOW.sigmas[-1].item(), 80.0)
    # x_t = (1 - t) x0 + t eps is the VP variable scaled by sqrt((1 - t)^2 + t^2).
    # The tables are float32: near t = 0, 1 - alpha_bar ~ 4e-6 keeps only a few digits, so sqrt(1 - alpha_bar)
    # is good to ~1e-5 absolute (an unseeded draw and a tolerance of 1e-6 failed on one CPU and not another).
    x0, eps = torch.randn(2, 5, 3, dtype=torch.float64, generator=seeded(0))
    i = torch.tensor([0, 100, 500, 900, 999])
    tt, a = t[i, None], FLOW.alpha_bar.double()[i, None]
    x_vp = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose((1 - tt) * x0 + tt * eps, x_vp * ((1 - tt) ** 2 + tt**2).sqrt(), atol=1e-4)
    log_sigma = EDM.sigmas.double().log()
    assert torch.allclose(log_sigma.diff(), log_sigma.diff()[0].expand(999), rtol=1e-4)


@pytest.mark.parametrize("schedule", [FLOW, EDM], ids=["flow", "edm"])
def test_continuous_time_is_exact_both_ways(schedule):
    index = torch.tensor([0.0, 0.25, 10.5, 500.0, 998.75, 999.0], dtype=torch.float64)
    sigma = t_to_sigma(schedule, index)
    assert torch.allclose(sigma_to_t(schedule, sigma), index, atol=1e-6)
    assert torch.allclose(sigma[[0, 3, 5]], schedule.sigmas.double()[[0, 500, 999]], rtol=1e-6)
    # Levels outside the table clamp the time input only.
    assert sigma_to_t(schedule, torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]


def test_ddim_on_the_flow_path_is_euler_on_its_ode():
    """DDIM (eta = 0) on the rectified-flow path equals Euler on dx/dt = v(x, t), step for step."""
    net = MIXTURE.net(FLOW, "velocity")
    sampler = DDIMSampler(steps=25, eta=0.0, spacing="trailing", clip_denoised=False)
    x_T = torch.randn(512, 3, generator=seeded(0), dtype=torch.float64)
    ddim = sampler.sample(Denoiser(net, FLOW, "velocity"), FLOW, x_T=x_T.float()).double()
    # Euler in the flow variable on the same grid of t, from x_t = x_vp sqrt((1 - t)^2 + t^2) to t = 0.
    steps = sampler.timesteps_for(FLOW).tolist()
    t_of = lambda i: (FLOW.sigmas.double()[i] / (1 + FLOW.sigmas.double()[i])).item()  # noqa: E731
    x = x_T * math.sqrt((1 - t_of(steps[0])) ** 2 + t_of(steps[0]) ** 2)
    for k, i in enumerate(steps):
        t_next = t_of(steps[k + 1]) if k + 1 < len(steps) else 0.0
        velocity = net(x.float(), torch.full((len(x),), float(i)), None).double()
        x = x + (t_next - t_of(i)) * velocity
    assert (ddim - x).abs().max().item() < 1e-4


@pytest.mark.parametrize("schedule,output", PAIRS, ids=IDS)
def test_every_output_gives_the_same_denoiser(schedule, output):
    """The exact network in any output space, through the preconditioning, is the same D."""
    reference = SigmaDenoiser(Denoiser(MIXTURE.net(schedule, "x0"), schedule, "x0"))
    denoiser = SigmaDenoiser(Denoiser(MIXTURE.net(schedule, output), schedule, output))
    x = torch.randn(64, 3, generator=seeded(1)) * 3
    for sigma in (0.01, 0.7, 5.0, 60.0):
        assert torch.allclose(denoiser(x, sigma), reference(x, sigma), atol=1e-4)
    # and the discrete route: (eps, x0) at table indices
    discrete = Denoiser(MIXTURE.net(schedule, output), schedule, output)
    exact = Denoiser(MIXTURE.net(schedule, "x0"), schedule, "x0")
    for t in (5, 400, 990):
        got, want = discrete.predict(x, t), exact.predict(x, t)
        assert torch.allclose(got[1], want[1], atol=1e-4) and torch.allclose(got[0], want[0], atol=1e-3)


@pytest.mark.parametrize("schedule,output", PAIRS, ids=IDS)
@pytest.mark.parametrize("sampler", [HeunSampler(steps=18), DPMSolverPPSampler(steps=20), DDIMSampler(steps=100,
                                                                                                        clip_denoised=False)],
                         ids=["heun-18", "dpm++-20", "ddim-100"])
def test_samplers_reproduce_the_mixture_on_every_path(schedule, output, sampler):
    """The closed-form sampler tests of tests/test_samplers_sigma.py, on the new paths and outputs."""
    x = sampler.sample(Denoiser(MIXTURE.net(schedule, output), schedule, output), schedule, (6000, 3),
                       generator=seeded(4))
    errors = MIXTURE.errors(x)
    assert errors["mean"] < 0.06 and errors["cov"] < 0.16 and errors["weights"] < 0.025, errors


def test_heun_default_starts_at_edm_sigma_max_everywhere():
    """One place for the default: the library's build_sampler('heun') equals conf/sampler/heun.yaml,
    and on the cosine schedule (sigma(T-1) ~ 2e4) it starts at 80."""
    heun = build_sampler("heun", steps=18)
    assert heun.sigmas_for(COSINE)[0].item() == 80.0
    x = heun.sample(Denoiser(MIXTURE.net(COSINE, "eps"), COSINE, "eps"), COSINE, (6000, 3), generator=seeded(4))
    assert MIXTURE.errors(x)["cov"] < 0.16
    top = HeunSampler(steps=18, sigma_max=COSINE.sigmas[-1].item())  # the old default, on request
    assert top.sigmas_for(COSINE)[0].item() > 2e4
    assert EulerSampler().sigmas_for(FLOW)[0].item() == pytest.approx(80.0)


# --------------------------------------------------------------------------- densities

def test_logit_normal_in_t_is_log_normal_in_sigma_on_the_flow_path():
    logit = LogitNormal(mean=0.3, std=1.1).sigmas(FLOW, 20_000, generator=seeded(0))
    lognormal = LogNormal(p_mean=0.3, p_std=1.1).sigmas(FLOW, 20_000, generator=seeded(1))
    assert stats.ks_2samp(logit.log().numpy(), lognormal.log().numpy()).pvalue > 0.01
    # and both are the stated normal in log sigma
    assert stats.kstest(logit.log().numpy(), "norm", args=(0.3, 1.1)).pvalue > 0.01
    # a different density is told apart
    other = LogNormal(p_mean=0.5, p_std=1.1).sigmas(FLOW, 20_000, generator=seeded(2))
    assert stats.ks_2samp(logit.log().numpy(), other.log().numpy()).pvalue < 1e-6


def test_uniform_density_per_path_and_stratification():
    t = Uniform().sigmas(FLOW, 20_000, generator=seeded(0))
    t_lo, t_hi = 0.002 / 1.002, 80 / 81  # the table's ends: t ~ U(t_lo, t_hi), nothing piles up at a clamp
    assert stats.kstest((t / (1 + t)).numpy(), "uniform", args=(t_lo, t_hi - t_lo)).pvalue > 0.01
    clamped = levels_of(FLOW, t)[1].double()
    assert stats.kstest((clamped / (1 + clamped)).numpy(), "uniform", args=(t_lo, t_hi - t_lo)).pvalue > 0.01
    s = Uniform().sigmas(EDM, 20_000, generator=seeded(0)).log()
    lo, hi = math.log(0.002), math.log(80.0)
    assert stats.kstest(((s - lo) / (hi - lo)).numpy(), "uniform").pvalue > 0.01  # log sigma uniform
    u = Uniform(stratified=True).uniforms(64, generator=seeded(3))
    assert sorted((u * 64).floor().long().tolist()) == list(range(64))  # one draw per bin
    t, sigma = Uniform(stratified=True).timesteps(COSINE, 1000, generator=seeded(4))
    assert t.dtype == torch.long and sorted(t.tolist()) == list(range(1000))
    assert torch.equal(sigma, COSINE.sigmas[t])
    t, sigma = Last().timesteps(FLOW, 4)
    assert t.tolist() == [999.0] * 4 and t.is_floating_point()


def test_continuous_levels_are_clamped_to_the_path_range():
    t, sigma = levels_of(FLOW, torch.tensor([1e-5, 1.0, 1e4], dtype=torch.float64))
    assert t.is_floating_point() and t[0] == 0 and t[2] == 999
    assert sigma[0] == pytest.approx(0.002, rel=1e-5) and sigma[1] == 1.0 and sigma[2] == pytest.approx(80.0)


def test_bad_density_settings():
    with pytest.raises(ValueError, match="p_std must be > 0"):
        LogNormal(p_std=0.0)
    with pytest.raises(ValueError, match="std must be > 0"):
        LogitNormal(std=-1.0)


# --------------------------------------------------------------------------- weightings

SIGMAS = torch.tensor([0.004, 0.05, 0.3, 1.0, 2.5, 20.0, 70.0], dtype=torch.float64)


def closed_form(name, sigma, sd=0.6, output="eps"):
    """Each weighting's weight on the x_0 error, from its paper."""
    snr = 1 / sigma**2
    c_out = coefficients(EDM if output == "edm" else COSINE, output, sigma)[2]
    return {
        "simplified": 1 / torch.as_tensor(c_out, dtype=torch.float64) ** 2,
        "min_snr": torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)),
        "soft_min_snr": snr * (1 / sd**2) / (snr + 1 / sd**2),
        "p2": snr / (1 + snr) ** 1.0,
        "edm": (sigma**2 + sd**2) / (sigma * sd) ** 2,
    }[name]


WEIGHTS = {"simplified": Simplified(), "min_snr": MinSNR(5.0), "soft_min_snr": SoftMinSNR(), "p2": P2(1.0, 1.0),
           "edm": EDMWeight()}


@pytest.mark.parametrize("name", sorted(WEIGHTS))
@pytest.mark.parametrize("schedule,output", [(EDM, "edm"), (EDM, "eps"), (FLOW, "velocity"), (FLOW, "x0")],
                         ids=["edm-edm", "edm-eps", "flow-velocity", "flow-x0"])
def test_each_weighting_is_its_weight_on_the_x0_error(name, schedule, output):
    """loss = w(sigma) ||D - x_0||^2 per sample, with w the paper's closed form, within 1e-6."""
    n = len(SIGMAS)
    x0 = torch.rand(n, 1, 3, 3, generator=seeded(0), dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=seeded(1), dtype=torch.float64)
    t = sigma_to_t(schedule, SIGMAS)
    outputs = torch.randn(x0.shape, generator=seeded(2), dtype=torch.float64)
    weighting = WEIGHTS[name]
    per_sample = []
    for i in range(n):
        loss = diffusion_loss(schedule, lambda x, tt, c: outputs[i : i + 1], x0[i : i + 1].float(), objective=output,
                              t=t[i : i + 1].float(), noise=noise[i : i + 1].float(), weighting=weighting)
        per_sample.append(loss.double())
    sigma = t_to_sigma(schedule, t.float()).double()  # the level the loss used
    c_in, c_skip, c_out = coefficients(schedule, output, sigma.view(-1, 1, 1, 1))
    x_sigma = x0 + sigma.view(-1, 1, 1, 1) * noise
    denoised = c_skip * x_sigma + c_out * outputs
    x0_error = (denoised - x0).square().flatten(1).mean(1)
    expected = closed_form(name, sigma, schedule.sigma_data, output) * x0_error
    if name == "simplified":
        c = torch.as_tensor(c_out, dtype=torch.float64).reshape(-1).expand(n)
        expected = x0_error / c**2
    assert torch.allclose(torch.stack(per_sample), expected, rtol=1e-5, atol=1e-6)


def test_weightings_match_diffusers_and_k_diffusion():
    sigma = SIGMAS
    sd = 0.6
    _, _, c_out = coefficients(EDM, "edm", sigma)
    # k-diffusion (layers.Denoiser): weights on its network's error with EDM's preconditioning:
    # "karras" = 1, "soft-min-snr" = (sigma sd)^2 / (sigma^2 + sd^2)^2, "snr" = sd^2 / (sigma^2 + sd^2).
    assert torch.allclose(EDMWeight().x0_weight(sigma, EDM, c_out) * c_out**2, torch.ones_like(sigma), atol=1e-12)
    k_soft = (sigma * sd) ** 2 / (sigma**2 + sd**2) ** 2
    assert torch.allclose(SoftMinSNR().x0_weight(sigma, EDM, c_out) * c_out**2, k_soft, rtol=1e-12)
    # diffusers (training_utils.compute_snr + its train_text_to_image min-SNR): on the eps error
    # min(snr, gamma) / snr, on the v error min(snr, gamma) / (snr + 1), at integer timesteps.
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    schedule = NoiseSchedule("cosine")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, trained_betas=schedule.betas.double().numpy())
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    snr = compute_snr(scheduler, t)
    gamma = torch.full_like(snr, 5.0)
    clipped = torch.stack([snr, gamma], dim=1).min(dim=1)[0]
    # diffusers builds alpha_bar in float32: 1 - alpha_bar at t = 0 (~4e-5) carries ~1e-3 relative round-off.
    assert torch.allclose(min_snr_weight(schedule, "eps", t, 5.0), clipped / snr, rtol=1e-3)
    assert torch.allclose(min_snr_weight(schedule, "v", t, 5.0), clipped / (snr + 1), rtol=1e-3)
    assert torch.allclose(min_snr_weight(schedule, "x0", t, 5.0), clipped, rtol=1e-3)


def test_uncertainty_weighting_learns_the_loss_level():
    """EDM2's u(sigma): zero at the start (the base weighting), then fitted so that
    exp(u) ~ the weighted error, which makes the loss even over noise levels."""
    weighting = Uncertainty(base="simplified")
    sigma = torch.tensor([0.05, 0.5, 5.0]).repeat(64)
    error = torch.tensor([0.02, 0.2, 2.0]).repeat(64)  # the error grows with sigma
    c_out = torch.ones_like(sigma)
    assert torch.equal(weighting.loss(error, sigma, EDM, c_out), error)  # u = 0
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        weighting.loss(error, sigma, EDM, c_out).mean().backward()
        optimizer.step()
    u = weighting.log_variance(torch.tensor([0.05, 0.5, 5.0]))
    assert torch.allclose(u.exp(), torch.tensor([0.02, 0.2, 2.0]), rtol=0.2)


def test_bad_weighting_settings():
    for make, match in [(lambda: MinSNR(gamma=0), "gamma must be > 0"), (lambda: SoftMinSNR(gamma=-1), "gamma"),
                        (lambda: P2(k=0), "k must be > 0"), (lambda: Uncertainty(base="x"), "base"),
                        (lambda: Uncertainty(features=3), "even")]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match="velocity.*schedule=flow"):
        Denoiser(lambda x, t, c: x, COSINE, "velocity")


def test_coefficients_are_edm_table_1_written_out():
    """Independent of the code under test: EDM Table 1 (VP, EDM columns) and the flow conversions."""
    s, sd = torch.tensor([0.01, 0.5, 3.0, 70.0], dtype=torch.float64), 0.6
    c_in, c_skip, c_out = coefficients(EDM, "edm", s)  # EDM column
    assert torch.allclose(c_in, 1 / (s**2 + sd**2).sqrt()) and torch.allclose(c_skip, sd**2 / (s**2 + sd**2))
    assert torch.allclose(c_out, s * sd / (s**2 + sd**2).sqrt())
    c_in, c_skip, c_out = coefficients(COSINE, "eps", s)  # VP column: c_skip 1, c_out -sigma, c_in 1/sqrt(1+s^2)
    assert torch.allclose(c_in, 1 / (1 + s**2).sqrt()) and c_skip == 1.0 and torch.equal(c_out, -s)
    # flow: t = s / (1 + s), x_t = (1 - t)(x0 + s eps), x0 = x_t - t v
    t = s / (1 + s)
    c_in, c_skip, c_out = coefficients(FLOW, "velocity", s)
    x0, eps = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x_sigma = x0 + s * eps
    x_t = (1 - t) * x0 + t * eps
    assert torch.allclose(c_in * x_sigma, x_t)
    assert torch.allclose(c_skip * x_sigma + c_out * (eps - x0), x0)
    assert torch.allclose(coefficients(FLOW, "x0", s)[0], 1 - t)
    # v on any path: x0 = x_sigma / (1 + s^2) - s / sqrt(1 + s^2) v, v = (eps - s x0) / sqrt(1 + s^2)
    _, c_skip, c_out = coefficients(FLOW, "v", s)
    assert torch.allclose(c_skip * x_sigma + c_out * (eps - s * x0) / (1 + s**2).sqrt(), x0)


def test_an_old_run_config_reads_in_todays_groups_and_resume_checks_them(tmp_path):
    from difflab.training.checkpoint import CheckpointError, check_resume_compatible, is_regression, training_method

    old = {"schedule": {"kind": "cosine", "num_timesteps": 1000},
           "objective": {"prediction": "v", "weighting": "min_snr", "min_snr_gamma": 3.0,
                         "timesteps": "logsnr_normal", "logsnr_mean": 2.0, "logsnr_std": 2.4}}
    method = training_method(old)
    assert method["objective"] == {"prediction": "v"}
    assert method["density"]["_target_"].endswith("LogNormal") and method["density"]["p_mean"] == -1.0
    assert method["density"]["p_std"] == 1.2 and method["weighting"]["gamma"] == 3.0
    assert is_regression({"objective": {"prediction": "x0", "timesteps": "last"}})
    assert is_regression({"density": {"_target_": "difflab.diffusion.density.Last"}})
    new = {"schedule": {"kind": "cosine", "num_timesteps": 1000, "sigma_min": 0.002, "sigma_max": 80.0,
                        "sigma_data": 0.61},
           "objective": {"prediction": "v"},
           "density": {"_target_": "difflab.diffusion.density.LogNormal", "p_mean": -1.0, "p_std": 1.2,
                       "stratified": False},
           "weighting": {"_target_": "difflab.diffusion.weighting.MinSNR", "gamma": 3.0}}
    assert training_method(new) == method  # the same recipe: resumable
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(1)}, "hyper_parameters": {"run_config": {**old, "model": {}}}}, ckpt)
    check_resume_compatible(ckpt, {**new, "model": {}})
    with pytest.raises(CheckpointError) as refused:
        check_resume_compatible(ckpt, {**new, "model": {}, "schedule": {"kind": "flow", "num_timesteps": 1000},
                                       "weighting": {"_target_": "difflab.diffusion.weighting.Simplified"}})
    assert "schedule.kind: checkpoint 'cosine', now 'flow'" in str(refused.value)
    assert "weighting._target_" in str(refused.value) and "weighting.gamma" in str(refused.value)


@pytest.mark.parametrize("schedule,output", [(FLOW, "velocity"), (EDM, "edm"), (COSINE, "edm"), (COSINE, "v")],
                         ids=["flow-velocity", "edm-edm", "cosine-edm", "cosine-v"])
def test_ddnm_projection_holds_on_every_path_and_output(schedule, output):
    """DDNM's wrapped network implies an x_0 with A(x_0) = y exactly, whatever the path and output."""
    from difflab.diffusion.degradation import Inpaint, make_keep
    from difflab.diffusion.restoration import NullSpaceProjection

    operator = Inpaint(make_keep("center", 8))
    y = operator.A(torch.rand(3, 1, 8, 8, generator=seeded(0)) * 2 - 1)
    raw = lambda x, t, c: torch.randn(x.shape, generator=seeded(1))  # noqa: E731
    wrapped = NullSpaceProjection(raw, schedule, output, operator, y)
    for index in (3.0, 500.0, 990.0):
        sigma = t_to_sigma(schedule, torch.tensor([index])).double()
        c_in, c_skip, c_out = coefficients(schedule, output, sigma.view(-1, 1, 1, 1))
        x = torch.randn(3, 1, 8, 8, generator=seeded(2)) * float(c_in * (1 + sigma**2).sqrt())
        out = wrapped(x, torch.full((3,), index), None).double()
        x0 = c_skip * x.double() / c_in + c_out * out
        assert torch.allclose(operator.A(x0.float()), y, atol=1e-4)
