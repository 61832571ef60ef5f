"""Training-free restoration: known pixels exact, consistency, the resampling path, and the
methods against the exact conditional distribution of Gaussian images (restoration_table)."""

import pytest
import torch

from difflab.diffusion.degradation import Downsample, Inpaint, make_keep
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.restoration import (
    METHODS,
    NullSpaceProjection,
    ReconstructionGuidance,
    Restoration,
    RestorationError,
    resample_path,
)
from difflab.diffusion.restoration_table import GaussianImage, measurement, run
from difflab.diffusion.samplers import DDIMSampler, DDPMSampler, build_sampler
from difflab.diffusion.schedule import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = NoiseSchedule("linear", 1000)
IMAGE = GaussianImage.smooth()  # 1x4x4, correlated pixels


def toy_net(x, t, cond=None):
    """A smooth stand-in network (any output will do for exactness and consistency)."""
    return (0.7 * torch.tanh(x) + 0.01 * t.float().reshape(-1, 1, 1, 1) / 1000).to(torch.bfloat16)


def truth(size=8, n=4):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


SAMPLERS = {"ddpm": dict(steps=12), "ddim": dict(steps=12, eta=0.5), "euler": dict(steps=8),
            "heun": dict(steps=6), "dpmpp": dict(steps=10), "pc": dict(steps=8)}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ilvr"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_known_pixels_come_out_bit_identical(method, sampler):
    keep = make_keep("strokes", 8, generator=torch.Generator().manual_seed(0))
    operator, x = Inpaint(keep), truth()
    restoration = Restoration(method, jump_length=3, jump_n_sample=2, travel_length=3, travel_repeat=2)
    out = restoration.restore(Denoiser(toy_net, SCHEDULE, "v"), SCHEDULE, build_sampler(sampler, **SAMPLERS[sampler]),
                              operator, operator.A(x), x.shape, generator=torch.Generator().manual_seed(1))
    assert (out - x)[:, :, keep].abs().max().item() == 0.0
    assert torch.isfinite(out).all() and not torch.equal(out[:, :, ~keep], x[:, :, ~keep])


@pytest.mark.parametrize("method", ["replacement", "ddnm", "ilvr"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_super_resolution_is_consistent_with_its_input(method, sampler):
    operator, x = Downsample(4), truth()
    y = operator.A(x)
    out = Restoration(method, jump_n_sample=1).restore(
        Denoiser(toy_net, SCHEDULE, "x0"), SCHEDULE, build_sampler(sampler, **SAMPLERS[sampler]), operator, y,
        x.shape, generator=torch.Generator().manual_seed(0))
    assert (operator.A(out) - y).abs().max() < 1e-6


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_ddnm_wrapper_projects_the_x0_prediction(objective):
    operator = Inpaint(make_keep("center", 4))
    x_true = IMAGE.sample(3, torch.Generator().manual_seed(0)).float()
    y = operator.A(x_true)
    net = IMAGE.net(SCHEDULE, objective)
    xt = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in (3, 400, 999):
        plain = Denoiser(net, SCHEDULE, objective).x0(xt, t)
        wrapped = Denoiser(NullSpaceProjection(net, SCHEDULE, objective, operator, y), SCHEDULE, objective).x0(xt, t)
        assert torch.allclose(wrapped, operator.project(plain, y), atol=2e-4 if objective == "eps" else 1e-5)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_reconstruction_guidance_moves_x0_down_the_gradient_of_its_measurement_error(objective):
    # The exact Gaussian network is linear in x_t: x0 = M x_t + b, so the gradient of
    # ||A x0 - y||^2 is 2 M^T A^T (A x0 - y), and Ho et al.'s step is -(w / 2) sqrt(alpha_bar) of it.
    operator = Inpaint(make_keep("left", 4))
    y = operator.A(IMAGE.sample(1, torch.Generator().manual_seed(0)).float()).double()
    net = IMAGE.net(SCHEDULE, objective)
    weight = 0.7
    for t in (30, 400, 900):
        xt = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        plain = Denoiser(net, SCHEDULE, objective, clip_range=None)
        guided = Denoiser(ReconstructionGuidance(net, SCHEDULE, objective, operator, y, weight), SCHEDULE,
                          objective, clip_range=None).x0(xt, t)
        x0 = plain.x0(xt, t)
        m = torch.autograd.functional.jacobian(lambda z: plain.x0(z.reshape(xt.shape), t).flatten(), xt.flatten())
        a = IMAGE.matrix(operator)
        grad = 2 * m.T @ a.T @ (a @ x0.flatten() - y.flatten())
        expected = x0.flatten() - 0.5 * weight * SCHEDULE.alpha_bar_at(torch.tensor([t])).double().sqrt() * grad
        assert torch.allclose(guided.flatten(), expected, atol=1e-8), (t, (guided.flatten() - expected).abs().max())
        if t < 500:  # at high noise x0 hardly depends on x_t, and so neither does its error
            assert not torch.allclose(guided, x0, atol=1e-3)


def test_resample_path_jumps_back_and_counts_network_calls():
    path = resample_path(10, 5, 3)
    assert path[:8] == [0, 1, 2, 3, 4, 5, 0, 1] and path[-1] == 10
    ups = [(a, b) for a, b in zip(path[:-1], path[1:]) if b < a]
    assert ups == [(5, 0), (5, 0)]  # jump_n_sample - 1 jumps at level 5, none at the data level 10
    assert all(b == a + 1 or a - b == 5 for a, b in zip(path[:-1], path[1:]))
    # The setting: 50 steps, jump 5, 5 passes -> 50 + 9 jump points x 4 x 5 steps.
    assert Restoration("repaint", jump_length=5, jump_n_sample=5).network_calls(50) == 230
    assert Restoration("replacement").network_calls(50) == 50
    assert Restoration("ddnm").network_calls(50) == 50  # DDNM's time-travel is off by default
    assert Restoration("ddnm", travel_length=5, travel_repeat=5).network_calls(50) == 230


def test_bad_settings_name_the_knob():
    with pytest.raises(RestorationError, match="unknown restoration method 'paint'; allowed: replacement, repaint"):
        Restoration("paint")
    with pytest.raises(RestorationError, match="jump_n_sample=0 must be an integer >= 1"):
        Restoration("repaint", jump_n_sample=0)
    with pytest.raises(RestorationError, match="ilvr_until"):
        Restoration("ilvr", ilvr_until=2.0)
    with pytest.raises(RestorationError, match="jump_length=10 must be smaller than the sampler's 10 steps"):
        Restoration("repaint", jump_length=10).path(10)
    with pytest.raises(RestorationError, match="travel_length=12 must be smaller"):
        Restoration("ddnm", travel_length=12, travel_repeat=2).path(10)
    with pytest.raises(RestorationError, match="travel_repeat=0 must be an integer >= 1"):
        Restoration("ddnm", travel_repeat=0)
    with pytest.raises(RestorationError, match="reconstruction_weight=0 must be a number > 0"):
        Restoration("guided", reconstruction_weight=0)
    operator, x = Inpaint(make_keep("left", 8)), truth()
    with pytest.raises(RestorationError, match="method=ilvr is low-pass guidance for super-resolution"):
        Restoration("ilvr").restore(Denoiser(toy_net, SCHEDULE, "eps"), SCHEDULE, DDIMSampler(steps=5), operator,
                                    operator.A(x), x.shape)


# --------------------------------------------------------------------------- closed form
# 4,000 restorations of one measurement: the standard error of a mean is <= 0.5 / 63 = 0.008
# and of a covariance entry about 0.25 * sqrt(2 / 4000) = 0.006.
N = 4000


def exact_conditional_samples(image, operator, y, n, seed=0):
    mean, cov = image.conditional(operator, y)
    jitter = 1e-9 * torch.eye(len(mean), dtype=torch.float64)
    chol = torch.linalg.cholesky(cov + jitter)
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (mean + z @ chol.T).reshape(n, *image.shape)


@pytest.mark.parametrize("operator", [Inpaint(make_keep("left", 4)), Downsample(2)], ids=["inpaint", "superres"])
def test_the_closed_form_harness_accepts_exact_samples_and_rejects_the_prior(operator):
    _, y = measurement(IMAGE, operator)
    exact = IMAGE.errors(exact_conditional_samples(IMAGE, operator, y, N), operator, y)
    assert exact["mean"] < 0.03 and exact["cov"] < 0.025
    prior = IMAGE.errors(IMAGE.sample(N, torch.Generator().manual_seed(2)), operator, y)
    assert prior["mean"] > 0.1


def test_every_method_is_exact_when_the_hole_is_independent_of_the_known_pixels():
    # Block-diagonal covariance: the left half says nothing about the right, so the hole's
    # conditional is its prior marginal and even replacement has no bias to show.
    image = GaussianImage.smooth()
    left = make_keep("right", 4).flatten()  # True on the left half ("right" is the hole)
    same_side = left[:, None] == left[None, :]
    image = GaussianImage(image.shape, image.mean, image.cov * same_side)
    operator = Inpaint(make_keep("left", 4))
    _, y = measurement(image, operator)
    for method in (Restoration("replacement"), Restoration("repaint", 5, 3), Restoration("ddnm")):
        errors = image.errors(run(image, SCHEDULE, operator, method, DDIMSampler(steps=100, clip_denoised=False), N),
                              operator, y)
        assert errors["mean"] < 0.03 and errors["cov"] < 0.03, (method, errors)


def test_replacement_is_biased_and_resampling_removes_most_of_it():
    operator = Inpaint(make_keep("left", 4))
    _, y = measurement(IMAGE, operator)
    sampler = DDPMSampler(steps=50, clip_denoised=False)
    replacement = IMAGE.errors(run(IMAGE, SCHEDULE, operator, Restoration("replacement"), sampler, N), operator, y)
    repaint = IMAGE.errors(run(IMAGE, SCHEDULE, operator, Restoration("repaint", 1, 20), sampler, N), operator, y)
    # Measured: replacement 0.48, RePaint (jump 1, 20 passes) 0.11 (README, "Restoration, measured").
    assert replacement["mean"] > 0.3
    assert repaint["mean"] < 0.2 and repaint["mean"] < 0.4 * replacement["mean"]
    # Reconstruction guidance conditions the hole through the network's Jacobian at 50 calls:
    # measured 0.13 with the default weight 8 (0.38 with weight 1).
    guided = IMAGE.errors(run(IMAGE, SCHEDULE, operator, Restoration("guided"), sampler, N), operator, y)
    assert guided["mean"] < 0.2 and guided["mean"] < 0.4 * replacement["mean"] and guided["cov"] < 0.1


@pytest.mark.parametrize("method", ["replacement", "ddnm"])
def test_super_resolution_matches_the_conditional(method):
    operator = Downsample(2)
    _, y = measurement(IMAGE, operator)
    errors = IMAGE.errors(run(IMAGE, SCHEDULE, operator, Restoration(method, jump_n_sample=1),
                              DDPMSampler(steps=100, clip_denoised=False), N), operator, y)
    assert errors["mean"] < 0.06 and errors["cov"] < 0.02, errors


@pytest.mark.parametrize("sampler", [DDPMSampler(steps=50, clip_denoised=False),
                                     build_sampler("euler", steps=30, sigma_max=80.0)], ids=["ddpm", "euler"])
def test_jumps_keep_the_prior_when_nothing_is_known(sampler):
    # With no known pixel, RePaint's path is plain sampling with forward jumps, which leave
    # the marginal of every level unchanged: the samples must still follow the data.
    operator = Inpaint(torch.zeros(4, 4, dtype=torch.bool))
    out = run(IMAGE, SCHEDULE, operator, Restoration("repaint", 5, 3), sampler, N).double().flatten(1)
    assert (out.mean(0) - IMAGE.mean).abs().max() < 0.03
    assert (torch.cov(out.T) - IMAGE.cov).abs().max() < 0.06
