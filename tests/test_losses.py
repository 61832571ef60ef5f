"""Training objectives and weightings."""

import pytest
import torch

from difflab.diffusion.density import LogNormal
from difflab.diffusion.losses import diffusion_loss, min_snr_weight, training_target
from difflab.diffusion.weighting import MinSNR

OBJECTIVES = ("eps", "x0", "v")  # the VP targets; the preconditioned outputs: tests/test_paths.py
from difflab.diffusion.process import predict_eps_from_x0, predict_x0_from_eps, v_from_x0_eps
from difflab.diffusion.schedule import NoiseSchedule, extract

SCHEDULE = NoiseSchedule("cosine", num_timesteps=1000)


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, t, noise


def consistent_net(objective, x0_hat):
    """A net whose prediction, in any objective, corresponds to the same x_0 estimate ``x0_hat``."""

    def net(xt, t, cond):
        eps_hat = predict_eps_from_x0(SCHEDULE, xt, t, x0_hat)
        return {"eps": eps_hat, "x0": x0_hat, "v": v_from_x0_eps(SCHEDULE, x0_hat, t, eps_hat)}[objective]

    return net


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("weighting", [None, MinSNR()])
def test_exact_prediction_gives_zero_loss(objective, weighting):
    x0, t, noise = batch()
    net = consistent_net(objective, x0)
    loss = diffusion_loss(SCHEDULE, net, x0, objective=objective, t=t, noise=noise, weighting=weighting)
    assert loss.ndim == 0
    assert loss.item() < 1e-8
    # And an oracle that only knows the noise recovers x0 through the conversions.
    oracle = lambda xt, tt, cond: training_target(  # noqa: E731
        SCHEDULE, objective, predict_x0_from_eps(SCHEDULE, xt, tt, noise), tt, noise
    )
    assert diffusion_loss(SCHEDULE, oracle, x0, objective=objective, t=t, noise=noise).item() < 1e-8


def test_training_targets_and_zero_net_losses_differ():
    x0, t, noise = batch(1)
    zero = lambda xt, tt, cond: torch.zeros_like(xt)  # noqa: E731
    a = extract(SCHEDULE.alpha_bar, t, 4)
    targets = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}
    losses = {}
    for objective in OBJECTIVES:
        target = training_target(SCHEDULE, objective, x0, t, noise)
        assert torch.allclose(target, targets[objective], atol=1e-6)
        losses[objective] = diffusion_loss(SCHEDULE, zero, x0, objective=objective, t=t, noise=noise).item()
        assert losses[objective] == pytest.approx(targets[objective].square().mean().item(), rel=1e-5)
    assert len({round(v, 4) for v in losses.values()}) == 3


def test_net_receives_q_sample_and_condition():
    x0, t, noise = batch(2)
    seen = {}

    def net(xt, tt, cond):
        seen.update(xt=xt, t=tt, cond=cond)
        return torch.zeros_like(xt)

    diffusion_loss(SCHEDULE, net, x0, t=t, noise=noise, cond="label")
    a = extract(SCHEDULE.alpha_bar, t, 4)
    assert torch.allclose(seen["xt"], a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    assert torch.equal(seen["t"], t) and seen["cond"] == "label"


def test_sampled_timesteps_cover_range_and_generator_reproduces():
    x0 = torch.zeros(4096, 2)
    seen = []

    def net(xt, t, cond):
        seen.append(t)
        return xt

    first = diffusion_loss(SCHEDULE, net, x0, generator=torch.Generator().manual_seed(5))
    again = diffusion_loss(SCHEDULE, net, x0, generator=torch.Generator().manual_seed(5))
    other = diffusion_loss(SCHEDULE, net, x0, generator=torch.Generator().manual_seed(6))
    t = seen[0]
    assert t.dtype == torch.long and t.shape == (4096,)
    assert t.min().item() >= 0 and t.max().item() <= 999
    assert t.min().item() < 20 and t.max().item() > 980
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    assert first.item() == again.item() and first.item() != other.item()


def test_loss_is_float32_for_bf16_predictions():
    x0, t, noise = batch(3)
    bf16_net = lambda xt, tt, cond: (noise + 0.1).to(torch.bfloat16)  # noqa: E731
    loss = diffusion_loss(SCHEDULE, bf16_net, x0, t=t, noise=noise)
    assert loss.dtype == torch.float32
    expected = ((noise + 0.1).to(torch.bfloat16).float() - noise).square().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_min_snr_weights_per_objective():
    t = torch.tensor([0, 300, 700, 999])
    snr = SCHEDULE.log_snr[t].double().exp()
    gamma = 5.0
    clipped = snr.clamp(max=gamma)
    assert torch.allclose(min_snr_weight(SCHEDULE, "eps", t, gamma).double(), clipped / snr, rtol=1e-5)
    assert torch.allclose(min_snr_weight(SCHEDULE, "x0", t, gamma).double(), clipped, rtol=1e-5)
    assert torch.allclose(min_snr_weight(SCHEDULE, "v", t, gamma).double(), clipped / (snr + 1), rtol=1e-5)


def test_min_snr_weighting_is_the_same_x0_loss_for_every_objective():
    """Hang et al. 2023 weight the x_0 error by min(SNR, gamma); rewritten per target the losses agree."""
    x0, t, noise = batch(4, n=64)
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))

    def loss(objective, **kwargs):
        net = consistent_net(objective, x0_hat)
        return diffusion_loss(SCHEDULE, net, x0, objective=objective, t=t, noise=noise, **kwargs).item()

    weighted = {objective: loss(objective, weighting=MinSNR()) for objective in OBJECTIVES}
    assert weighted["eps"] == pytest.approx(weighted["x0"], rel=1e-3)
    assert weighted["v"] == pytest.approx(weighted["x0"], rel=1e-3)
    unweighted = [loss(objective) for objective in OBJECTIVES]
    assert len({round(v, 3) for v in unweighted}) == 3
    smaller_gamma = loss("x0", weighting=MinSNR(gamma=1.0))
    assert smaller_gamma < weighted["x0"]


def test_bad_objective_and_weighting():
    x0, t, noise = batch()
    net = lambda xt, tt, cond: xt  # noqa: E731
    with pytest.raises(ValueError, match="'score'.*eps, x0, v, velocity, edm"):
        diffusion_loss(SCHEDULE, net, x0, objective="score")
    with pytest.raises(ValueError, match="velocity.*schedule=flow"):
        diffusion_loss(SCHEDULE, net, x0, objective="velocity")
    with pytest.raises(ValueError, match="eps, x0, v"):
        training_target(SCHEDULE, "epsilon", x0, t, noise)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        MinSNR(gamma=0.0)


def test_lognormal_density_lands_on_the_nearest_timestep_in_log_sigma():
    schedule = NoiseSchedule("cosine", num_timesteps=1000)
    # EDM's density in VP terms: log SNR = -2 log sigma ~ N(-2 p_mean, 2 p_std).
    t, sigma = LogNormal(p_mean=-0.5, p_std=1.0).timesteps(schedule, 50_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 1000
    log_snr = schedule.log_snr[t]
    assert abs(float(log_snr.mean()) - 1.0) < 0.05 and abs(float(log_snr.std()) - 2.0) < 0.05
    assert torch.equal(sigma, schedule.sigmas[t])
    # Each draw lands on the timestep whose log sigma is nearest: no neighbour is closer.
    density = LogNormal(p_mean=0.0, p_std=1.0)
    raw = density.sigmas(schedule, 3, generator=torch.Generator().manual_seed(1))
    picked, _ = density.timesteps(schedule, 3, generator=torch.Generator().manual_seed(1))
    for value, step in zip(raw, picked):
        distances = (schedule.sigmas.double().log() - value.log()).abs()
        assert distances[step] == distances.min()


def test_the_training_density_reaches_the_loss():
    schedule = NoiseSchedule("cosine", num_timesteps=1000)
    seen = []

    def net(xt, t, cond):
        seen.append(t.clone())
        return torch.zeros_like(xt)

    x0 = torch.zeros(4096, 1, 2, 2)
    diffusion_loss(schedule, net, x0, density=LogNormal(p_mean=-3.0, p_std=0.25))
    diffusion_loss(schedule, net, x0)
    assert seen[0].float().mean() < 200 < seen[1].float().mean()  # low sigma: early timesteps
