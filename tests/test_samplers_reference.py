"""Our samplers against diffusers' schedulers (a test-only dependency), like for like.

Both sides get the same model function (the exact mixture network of
``closed_form_table`` predicting eps, x0 or v, or an arbitrary smooth function of (x, t)
read as eps), the same initial noise and, where a sampler is stochastic, the same
generator, which both draw per-step noise from in the same order. Each diffusers
scheduler is given our float32 alpha_bar table (``alphas_cumprod``), so both sides start
from the same numbers. Agreement: ``max |ours - diffusers| <= 1e-4 * max |diffusers|``
(REL_TOL, relative to the size of the samples).

Where diffusers differs by design, the comparison is made like for like and says how:
- DDPM on an array that does not end at t = 0 ("trailing"): diffusers adds noise on its
  final step (it only skips noise at t = 0); our last step lands on alpha_bar = 1 with no
  noise (Ho et al. Alg. 2, z = 0 on the last step). Compared up to the last step, and our
  output against diffusers' x0 prediction of the last step (which is what the step's
  mean is when alpha_bar_prev = 1).
- DDIM with "trailing"/"linspace" spacing: diffusers takes the previous timestep as
  ``t - T // steps`` instead of the next element of the array, which is wrong for those
  spacings (design notes). There we test against DDIM eq. 12/16 on the array instead.
- DPM-Solver++: diffusers' "linspace"/"leading" arrays are built from steps + 1 points,
  ours from ``timesteps()``; diffusers gets our array via ``set_timesteps(timesteps=...)``
  ("trailing" is the same array on both sides and uses diffusers' own). Our default
  "logsnr" grid has fractional timesteps; diffusers' nearest option (``use_lu_lambdas``)
  rounds them to integers, so diffusers is fed our sigma grid and timesteps instead.
- Euler/Heun: both use EDM's rho = 7 grid between the table's ends and interpolate log
  sigma for the timestep, so diffusers' own ``use_karras_sigmas=True`` grid is compared.
  Churn is not compared: diffusers' Euler evaluates the model before adding the churn
  noise and its Heun has none; EDM Alg. 2 evaluates D at the churned point, as we do
  (covered in test_samplers_sigma).
"""

import math

import pytest
import torch

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    EulerSampler,
    HeunSampler,
    timesteps,
)
from difflab.diffusion.samplers.closed_form_table import GaussianMixture
from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.sigma import sigma_range, t_to_sigma

REL_TOL = 1e-4
MIXTURE = GaussianMixture.default(3)
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
T = 1000
BATCH = 512


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


SCHEDULES = {kind: NoiseSchedule(kind, num_timesteps=T) for kind in ("linear", "cosine")}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_eps(schedule):
    """A fixed, deterministic, nonlinear function of (x, t), read as an eps prediction."""

    def net(x, t, cond=None):
        u = (t.to(torch.float64) / T).reshape(-1, 1)
        xd = x.double()
        return (torch.tanh(1.5 * xd + u) * (0.5 + u) + 0.1 * torch.sin(3 * xd)).to(x.dtype)

    return net


def model(name, schedule, objective):
    return MIXTURE.net(schedule, objective) if name == "mixture" else smooth_eps(schedule)


def configure(cls, schedule, objective="eps", **kwargs):
    """A diffusers scheduler on our betas and our float32 alpha_bar table."""
    scheduler = cls(
        num_train_timesteps=T,
        trained_betas=schedule.betas.double().tolist(),
        prediction_type=PREDICTION_TYPES[objective],
        **kwargs,
    )
    scheduler.alphas_cumprod = schedule.alpha_bar.clone()
    if hasattr(scheduler, "lambda_t"):  # DPM-Solver keeps derived tables too
        scheduler.alpha_t = scheduler.alphas_cumprod.sqrt()
        scheduler.sigma_t = (1 - scheduler.alphas_cumprod).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    return scheduler


def assert_matches(ours, reference, what=""):
    scale = reference.abs().max().item()
    error = (ours - reference).abs().max().item()
    assert error <= REL_TOL * scale, f"{what}: max error {error:.2e} vs {REL_TOL:.0e} x {scale:.2f}"


def noise(seed=0):
    return torch.randn(BATCH, 3, generator=seeded(seed))


def batch_t(t, dtype=None):
    t = torch.as_tensor(t)
    return t.to(dtype or t.dtype).expand(BATCH)


# --------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize(
    "variance, clip, objective, net_name, steps",
    [
        ("posterior", False, "eps", "mixture", 50),
        ("beta", False, "v", "mixture", 50),
        ("posterior", True, "x0", "mixture", 20),
        ("posterior", True, "eps", "smooth", 20),
        ("beta", False, "eps", "smooth", None),
    ],
)
def test_ddpm_matches_diffusers(spacing, variance, clip, objective, net_name, steps):
    schedule = SCHEDULES["linear"]
    net = model(net_name, schedule, objective)
    scheduler = configure(
        DDPMScheduler, schedule, objective, variance_type="fixed_small" if variance == "posterior" else "fixed_large",
        clip_sample=clip, timestep_spacing=spacing,
    )
    scheduler.set_timesteps(steps or T)
    ours_sampler = DDPMSampler(steps=steps, variance=variance, clip_denoised=clip, spacing=spacing)
    assert scheduler.timesteps.tolist() == ours_sampler.timesteps_for(schedule).tolist()
    x_T = noise()
    ours, trajectory = ours_sampler.sample(
        Denoiser(net, schedule, objective), schedule, x_T=x_T, generator=seeded(1), return_trajectory=True
    )
    x, generator = x_T.clone(), seeded(1)
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(net(x, batch_t(t)), t, x, generator=generator)
        last = i == len(scheduler.timesteps) - 1
        if last and t > 0:
            # diffusers adds noise on this final step; ours lands on alpha_bar = 1 without it,
            # at the step's mean, which for alpha_bar_prev = 1 is the x0 prediction.
            assert_matches(ours, out.pred_original_sample, "last step")
            break
        x = out.prev_sample
        if i % 10 == 0 or last:
            assert_matches(trajectory[i], x, f"step {i}")
    else:
        assert_matches(ours, x, "samples")


# --------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(
    "kind, clip, objective, net_name, steps",
    [("linear", False, "eps", "mixture", 50), ("cosine", False, "v", "mixture", 30),
     ("linear", True, "x0", "mixture", 25), ("cosine", True, "eps", "smooth", 10)],
)
def test_ddim_leading_matches_diffusers(eta, kind, clip, objective, net_name, steps):
    schedule = SCHEDULES[kind]
    net = model(net_name, schedule, objective)
    # use_clipped_model_output: our DDIM recomputes eps from the clipped x0 (so both terms
    # of eq. 12 describe one x0); diffusers does that only when asked.
    scheduler = configure(DDIMScheduler, schedule, objective, clip_sample=clip, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    sampler = DDIMSampler(steps=steps, eta=eta, spacing="leading", clip_denoised=clip)
    assert scheduler.timesteps.tolist() == sampler.timesteps_for(schedule).tolist()
    x_T = noise(2)
    ours = sampler.sample(Denoiser(net, schedule, objective), schedule, x_T=x_T, generator=seeded(3))
    x, generator = x_T.clone(), seeded(3)
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, batch_t(t)), t, x, eta=eta, use_clipped_model_output=True,
                           generator=generator).prev_sample
    assert_matches(ours, x)


def ddim_paper(net, objective, schedule, ts, x, eta, generator):
    """DDIM (Song et al. 2021) eq. 12 with sigma from eq. 16, stepping along the array ``ts``."""
    alpha_bar = schedule.alpha_bar.double()
    ts = ts.tolist()
    for i, t in enumerate(ts):
        a = alpha_bar[t].item()
        a_prev = alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        out = net(x, batch_t(t)).double()
        xd = x.double()
        if objective == "eps":
            eps, x0 = out, (xd - math.sqrt(1 - a) * out) / math.sqrt(a)
        else:  # v
            eps, x0 = math.sqrt(1 - a) * xd + math.sqrt(a) * out, math.sqrt(a) * xd - math.sqrt(1 - a) * out
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x_prev.to(x.dtype)
    return x


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("objective, net_name", [("eps", "mixture"), ("v", "mixture"), ("eps", "smooth")])
def test_ddim_trailing_linspace_match_the_paper(spacing, eta, objective, net_name):
    """diffusers' DDIM steps to ``t - T // steps``, which is not the next element of these
    arrays (below), so here the reference is DDIM eq. 12/16 walked along the array."""
    schedule, steps = SCHEDULES["linear"], 30
    net = model(net_name, schedule, objective)
    ts = timesteps(T, steps, spacing)
    scheduler = configure(DDIMScheduler, schedule, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == ts.tolist()  # same array ...
    formula_prev = (ts[:-1] - T // steps).tolist()
    assert formula_prev != ts[1:].tolist()  # ... but diffusers' previous timesteps are not on it
    x_T = noise(4)
    sampler = DDIMSampler(steps=steps, eta=eta, spacing=spacing, clip_denoised=False)
    ours = sampler.sample(Denoiser(net, schedule, objective), schedule, x_T=x_T, generator=seeded(5))
    assert_matches(ours, ddim_paper(net, objective, schedule, ts, x_T.clone(), eta, seeded(5)))


# --------------------------------------------------------------------------- DPM-Solver++


def run_diffusers(scheduler, net, x_T):
    """diffusers' sampling loop: scaled initial noise, scale_model_input, model, step."""
    x = x_T.clone() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), batch_t(t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("objective, net_name", [("eps", "mixture"), ("v", "mixture"), ("x0", "mixture"),
                                                 ("eps", "smooth")])
@pytest.mark.parametrize("spacing, steps", [("trailing", 20), ("linspace", 20), ("leading", 15), ("logsnr", 20),
                                            ("karras", 12)])
def test_dpm_solver_pp_2m_matches_diffusers(objective, net_name, spacing, steps):
    schedule = SCHEDULES["linear"]
    net = model(net_name, schedule, objective)
    sampler = DPMSolverPPSampler(steps=steps, order=2, spacing=spacing)
    scheduler = configure(
        DPMSolverMultistepScheduler, schedule, objective, algorithm_type="dpmsolver++", solver_order=2,
        lower_order_final=True, timestep_spacing=spacing if spacing == "trailing" else "linspace",
    )
    ours_ts = sampler.timesteps_for(schedule)
    if spacing == "trailing":
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == ours_ts.tolist()
    elif spacing in ("linspace", "leading"):
        scheduler.set_timesteps(timesteps=ours_ts.tolist())
    else:
        # Feed our sigma grid and its fractional timesteps (diffusers would round them).
        scheduler.set_timesteps(timesteps=list(range(steps - 1, -1, -1)))
        scheduler.sigmas = sampler.sigmas_for(schedule).to(torch.float32)
        scheduler.timesteps = ours_ts.to(torch.float32)
    # Same grid; diffusers derives sigma in float32 from alpha_bar, whose 1 - alpha_bar at
    # t = 0 (1e-4) keeps only ~4 digits, our float32 sigma table keeps 7.
    assert torch.allclose(scheduler.sigmas.double(), sampler.sigmas_for(schedule), rtol=5e-4)
    x_T = noise(6)
    ours = sampler.sample(Denoiser(net, schedule, objective), schedule, x_T=x_T)
    assert_matches(ours, run_diffusers(scheduler, net, x_T))


def test_dpm_solver_pp_first_order_matches_diffusers():
    schedule = SCHEDULES["cosine"]
    net = model("mixture", schedule, "eps")
    sampler = DPMSolverPPSampler(steps=25, order=1, spacing="leading")
    scheduler = configure(DPMSolverMultistepScheduler, schedule, algorithm_type="dpmsolver++", solver_order=1)
    scheduler.set_timesteps(timesteps=sampler.timesteps_for(schedule).tolist())
    x_T = noise(7)
    assert_matches(sampler.sample(Denoiser(net, schedule), schedule, x_T=x_T), run_diffusers(scheduler, net, x_T))


# --------------------------------------------------------------------------- Euler / Heun (EDM)


def edm_range(schedule):
    """Our (sigma_min, sigma_max) for diffusers' Euler/Heun. Left alone, they derive
    sigma(t = 0) in float32 from alpha_bar, where 1 - alpha_bar = 1e-4 keeps ~4 digits, and
    their grid's low end then sits 1e-4 (relative) off ours."""
    lo, hi = sigma_range(schedule)
    return {"sigma_min": lo, "sigma_max": hi}


@pytest.mark.parametrize("objective, net_name", [("eps", "mixture"), ("v", "mixture"), ("x0", "mixture"),
                                                 ("eps", "smooth")])
@pytest.mark.parametrize("steps", [10, 50])
def test_euler_matches_diffusers(objective, net_name, steps):
    schedule = SCHEDULES["linear"]
    net = model(net_name, schedule, objective)
    sampler = EulerSampler(steps=steps, sigma_max=sigma_range(schedule)[1])  # diffusers starts at the top
    scheduler = configure(EulerDiscreteScheduler, schedule, objective, use_karras_sigmas=True,
                          **edm_range(schedule))
    scheduler.set_timesteps(steps)
    assert torch.allclose(scheduler.sigmas.double(), sampler.sigmas_for(schedule), rtol=1e-6)
    # Its sigma -> t interpolation runs over its own float32 log-sigma table (imprecise
    # near t = 0, as above): fractional timesteps agree to ~3e-4.
    assert torch.allclose(scheduler.timesteps.double(), sampler.timesteps_for(schedule), atol=1e-3)
    x_T = noise(8)
    ours = sampler.sample(Denoiser(net, schedule, objective), schedule, x_T=x_T)
    assert_matches(ours, run_diffusers(scheduler, net, x_T))


def test_euler_sigma_max_override_matches_diffusers():
    """On the cosine schedule (sigma(T-1) = 2e4) with EDM's sigma_max = 80 on both sides."""
    schedule = SCHEDULES["cosine"]
    net = model("mixture", schedule, "eps")
    sampler = EulerSampler(steps=30, sigma_max=80.0)
    scheduler = configure(EulerDiscreteScheduler, schedule, use_karras_sigmas=True, sigma_max=80.0)
    scheduler.set_timesteps(30)
    x_T = noise(9)
    assert_matches(sampler.sample(Denoiser(net, schedule), schedule, x_T=x_T), run_diffusers(scheduler, net, x_T))


@pytest.mark.parametrize("objective, net_name", [("eps", "mixture"), ("v", "mixture"), ("x0", "mixture"),
                                                 ("eps", "smooth")])
@pytest.mark.parametrize("kind, steps", [("linear", 18), ("linear", 5), ("cosine", 18)])
def test_heun_matches_diffusers(objective, net_name, kind, steps):
    schedule = SCHEDULES[kind]
    net = model(net_name, schedule, objective)
    sampler = HeunSampler(steps=steps, sigma_max=sigma_range(schedule)[1])  # diffusers starts at the top
    scheduler = configure(HeunDiscreteScheduler, schedule, objective, use_karras_sigmas=True)
    # Its constructor has no sigma_min/sigma_max, but its Karras grid reads them from the config.
    scheduler.register_to_config(**edm_range(schedule))
    scheduler.set_timesteps(steps)
    assert torch.allclose(scheduler.sigmas[::2].double(), sampler.sigmas_for(schedule)[:-1], rtol=1e-6)
    assert len(scheduler.timesteps) == 2 * steps - 1  # same number of network calls
    x_T = noise(10)
    ours = sampler.sample(Denoiser(net, schedule, objective), schedule, x_T=x_T)
    assert_matches(ours, run_diffusers(scheduler, net, x_T))


def test_model_sees_the_same_noise_levels():
    """The mixture network's noise level at diffusers' float timesteps is diffusers' sigma
    (to the ~1e-4 its float32 table near t = 0 allows)."""
    schedule = SCHEDULES["linear"]
    scheduler = configure(EulerDiscreteScheduler, schedule, use_karras_sigmas=True, **edm_range(schedule))
    scheduler.set_timesteps(18)
    sigmas = t_to_sigma(schedule, scheduler.timesteps.double())
    assert torch.allclose(sigmas, scheduler.sigmas[:-1].double(), rtol=2e-4)
