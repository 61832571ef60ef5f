"""Consistency tuning (ECT) and multistep consistency sampling.

The proof: on Gaussian data with a per-level linear network, ECT's loss at a one-level gap has a
closed-form fixed point (each level regresses the level below on the same noise), and that
fixed point is the probability-flow ODE's consistency function as the table gets finer; training
with ``ConsistencyTuning.loss`` from the denoiser's solution reaches it.
"""

from __future__ import annotations

import pytest
import torch

from difflab.diffusion.consistency import ConsistencyTuning
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.samplers import ConsistencySampler, build_sampler
from difflab.diffusion.schedule import NoiseSchedule

import warm_process

S = 0.5  # the data std of the Gaussian tests (= the edm path's sigma_data)


class Gains(torch.nn.Module):
    """F(x, t) = g_t x: on the edm path with output x0, D(x_sigma) = g_t c_in x_sigma."""

    def __init__(self, gains: torch.Tensor) -> None:
        super().__init__()
        self.g = torch.nn.Parameter(gains.float().clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.g[t].view(-1, *[1] * (x.ndim - 1)) * x


def edm(T: int) -> NoiseSchedule:
    return NoiseSchedule(kind="edm", num_timesteps=T, sigma_data=S)


def denoiser_gains(sigmas: torch.Tensor) -> torch.Tensor:
    """The exact denoiser of N(0, S^2) data, D = S^2 / (S^2 + sigma^2) x_sigma, as gains on c_in x_sigma."""
    return S**2 / (S**2 + sigmas**2) * (sigmas**2 + S**2).sqrt()


def chain_fixed_point(sigmas: torch.Tensor) -> torch.Tensor:
    """Level 0 regresses x_0 (the denoiser), level i regresses level i-1's prediction on the same
    noise: a_i = a_{i-1} E[x_i x_{i-1}] / E[x_i^2] = a_{i-1} (S^2 + s_i s_{i-1}) / (S^2 + s_i^2)."""
    a = torch.empty_like(sigmas)
    a[0] = S**2 / (S**2 + sigmas[0] ** 2)
    for i in range(1, len(sigmas)):
        a[i] = a[i - 1] * (S**2 + sigmas[i] * sigmas[i - 1]) / (S**2 + sigmas[i] ** 2)
    return a * (sigmas**2 + S**2).sqrt()


def test_fixed_point_is_the_consistency_function_on_a_fine_table():
    # The PF-ODE of N(0, S^2) data maps x_sigma to S / sqrt(S^2 + sigma^2) x_sigma: gain S at every level.
    sigmas = edm(2000).sigmas.double()
    assert torch.allclose(chain_fixed_point(sigmas), torch.full_like(sigmas, S), rtol=5e-3)
    assert denoiser_gains(sigmas)[-1] < 0.01  # the denoiser's one step is far from it


def test_ect_loss_trains_a_denoiser_into_the_consistency_fixed_point():
    schedule = edm(40)
    sigmas = schedule.sigmas.double()
    net = Gains(denoiser_gains(sigmas))
    denoiser = Denoiser(net, schedule, "x0", clip_range=None)
    # c large: the pseudo-Huber distance is the squared error, whose minimiser is the regression above.
    tuning = ConsistencyTuning(p_mean=0.0, p_std=3.0, c=100.0)  # wide: every level gets draws
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-2)
    steps = 1500
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x0 = torch.randn(1024, 1, 1, 1, generator=generator) * S
        loss = tuning.loss(denoiser, x0, stage=30, generator=generator)  # stage 30: a one-level gap
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
    learned, expected = net.g.detach().double(), chain_fixed_point(sigmas)
    assert torch.allclose(learned[10:], expected[10:], atol=0.015)
    assert learned[-1] > 0.4 and denoiser_gains(sigmas)[-1] < 0.01  # far from where it started
    # One consistency step from pure noise now draws samples of about the data's std.
    samples = ConsistencySampler(steps=1, clip_denoised=False).sample(
        denoiser, schedule, (4096, 1, 1, 1), generator=torch.Generator().manual_seed(2))
    assert abs(float(samples.std()) - float(expected[-1])) < 0.02


def test_mapping_starts_as_denoising_and_closes_the_gap_stage_by_stage():
    tuning = ConsistencyTuning(stages=8)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    assert torch.equal(tuning.r_of(sigma[:3], 0), torch.zeros(3))  # stage 0 at low noise: r = 0, target x_0
    gaps = torch.stack([1 - tuning.r_of(sigma, stage) / sigma for stage in range(8)])
    assert bool((gaps[1:] <= gaps[:-1]).all()) and float(gaps[-1].max()) < 0.05  # r -> t
    assert [tuning.stage(s, 800) for s in (0, 99, 100, 799, 5000)] == [0, 0, 1, 7, 7]


def test_levels_keep_r_below_t_and_use_the_clean_end():
    schedule = NoiseSchedule(kind="cosine", num_timesteps=1000)
    tuning = ConsistencyTuning(stages=4)
    generator = torch.Generator().manual_seed(0)
    t, r = tuning.levels(schedule, 4096, stage=0, generator=generator)
    assert t.dtype == r.dtype == torch.long and bool((r < t).all()) and bool((r >= -1).all()) and int(t.min()) >= 1
    assert 0.2 < float((r == -1).float().mean()) < 1.0  # stage 0: much of the batch regresses x_0 itself
    t, r = tuning.levels(schedule, 4096, stage=3, generator=generator)
    sigmas = schedule.sigmas.double()
    target = tuning.r_of(sigmas[t], 3)
    forced = r == t - 1  # the gap is at least one level
    at_or_below = (r == -1) | (sigmas[r.clamp(min=0)] <= target)
    largest = sigmas[(r + 1).clamp(max=999)] > target  # the next level up is above the mapped sigma
    assert bool((forced | (at_or_below & largest)).all())
    assert float((r == -1).float().mean()) < 0.2


def test_loss_at_stage_zero_is_the_weighted_distance_to_x0():
    schedule = edm(40)
    net = Gains(torch.rand(40))
    denoiser = Denoiser(net, schedule, "x0", clip_range=None)
    tuning = ConsistencyTuning(k=10.0, b=0.0)  # a gap wider than t everywhere: r = 0, the target is x_0
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * S
    loss = tuning.loss(denoiser, x0, stage=0, generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    t, r = tuning.levels(schedule, 64, 0, generator=generator)
    assert bool((r == -1).all())
    noise = torch.randn(x0.shape, generator=generator)
    sigma = schedule.sigmas[t].view(-1, 1, 1, 1)
    prediction = net.g.detach()[t].view(-1, 1, 1, 1) * (x0 + sigma * noise) / (sigma**2 + S**2).sqrt()
    distance = (prediction - x0).square().flatten(1).sum(1).sqrt()
    expected = ((sigma.flatten() ** -2 + 1 / S**2) * distance).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_target_is_not_trained_through():
    schedule = edm(40)
    net = Gains(torch.rand(40) + 0.5)
    denoiser = Denoiser(net, schedule, "x0", clip_range=None)
    tuning = ConsistencyTuning(c=100.0)
    x0 = torch.randn(512, 1, 1, 1, generator=torch.Generator().manual_seed(5)) * S
    tuning.loss(denoiser, x0, stage=30, generator=torch.Generator().manual_seed(6)).backward()
    t, r = tuning.levels(schedule, 512, 30, generator=torch.Generator().manual_seed(6))
    never_t = sorted(set(range(40)) - set(t.tolist()))  # levels that only served as targets
    assert never_t and torch.equal(net.g.grad[never_t], torch.zeros(len(never_t)))


def test_consistency_sampler_steps():
    schedule = NoiseSchedule(kind="cosine", num_timesteps=1000)
    net = Gains(torch.linspace(0.1, 1.0, 1000))
    denoiser = Denoiser(net, schedule, "x0")
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    one = ConsistencySampler(steps=1).sample(denoiser, schedule, x_T=noise)
    assert torch.equal(one, denoiser.x0(noise, 999, clip=True))
    two = ConsistencySampler(steps=2, sigmas=[0.8])
    ts = two.timesteps_for(schedule).tolist()
    assert ts[0] == 999 and abs(float(schedule.sigmas[ts[1]]) - 0.8) < 0.01
    generator = torch.Generator().manual_seed(1)
    out = two.sample(denoiser, schedule, x_T=noise, generator=torch.Generator().manual_seed(1))
    first = denoiser.x0(noise, 999, clip=True)
    a = float(schedule.alpha_bar[ts[1]])
    renoised = a**0.5 * first + (1 - a) ** 0.5 * torch.randn(noise.shape, generator=generator)
    assert torch.allclose(out, denoiser.x0(renoised, ts[1], clip=True))
    assert build_sampler("consistency", steps=2).timesteps_for(schedule).tolist() == [999, 499]


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 2, "sigmas": [0.8, 0.2]}, "1 of them"),
    ({"steps": 3, "sigmas": [0.2, 0.8]}, "decreasing"),
    ({"steps": 0}, "steps must be"),
    ({"spacing": "log"}, "spacing"),
])
def test_consistency_sampler_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConsistencySampler(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"p_std": 0.0}, "p_std"), ({"q": 1.0}, "q must be"), ({"stages": 0}, "stages"), ({"c": -1.0}, "c="),
    ({"sigma_data": 0.0}, "sigma_data"),
])
def test_tuning_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConsistencyTuning(**kwargs)


def _run(module, *args, cwd):
    import subprocess
    import sys

    return warm_process.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)


TINY = ["data=digits", "schedule=cosine", "objective=v", "density=uniform", "data.batch_size=64", "model=unet_tiny",
        "model.mid_attention=false", "trainer.precision=32-true", "trainer.max_time=null", "callbacks.fid=null", "callbacks.progress_bar=null"]


@pytest.mark.slow  # a minute of 2 AVX2 cores: `make test-slow`
def test_tuning_runs_end_to_end_and_refuses_a_model_of_another_path(tmp_path):
    import numpy as np

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    proc = _run("difflab.cli.train", "experiment=digits_tiny", "trainer.max_epochs=1", "callbacks.fid=null",
                "callbacks.progress_bar=null", f"hydra.run.dir={base}", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    start = base / "checkpoints" / "ema.pt"
    proc = _run("difflab.cli.train", "experiment=mnist5k_ect", *TINY, "trainer.max_epochs=1", f"init_from={start}",
                f"hydra.run.dir={tuned}", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    before = torch.load(start, weights_only=True)["state_dict"]
    after = torch.load(tuned / "checkpoints" / "ema.pt", weights_only=True)["state_dict"]
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert (tuned / "samples" / "final.png").is_file()
    # Exported to safetensors (difflab-export), the tuned model samples from that file.
    proc = _run("difflab.cli.export", f"ckpt={tuned / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'ect.safetensors'}",
                f"hydra.run.dir={tmp_path / 'export'}", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "ect.safetensors").is_file(), proc.stderr[-4000:]
    out = tmp_path / "sampled"
    proc = _run("difflab.cli.sample", f"ckpt={tmp_path / 'ect.safetensors'}", "n=4", "sampler=consistency",
                "sampler.steps=2", "progress=false", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    images = np.load(out / "samples.npz")["images"]
    assert images.shape[0] == 4 and np.isfinite(images).all()

    # The same weights said to be a rectified-flow model: refused, naming the path, no traceback.
    payload = torch.load(start, weights_only=True)
    payload["run_config"]["schedule"]["kind"] = "flow"
    payload["run_config"]["objective"]["prediction"] = "velocity"
    flow = tmp_path / "flow-ema.pt"
    torch.save(payload, flow)
    run = tmp_path / "refused"
    proc = _run("difflab.cli.train", "experiment=mnist5k_ect", *TINY, f"init_from={flow}", f"hydra.run.dir={run}",
                f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0 and "schedule.kind: checkpoint 'flow', now 'cosine'" in proc.stderr, proc.stderr[-3000:]
    assert "schedule=flow objective=velocity" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("args, message", [
    ([], "set init_from="),
    (["init_from=START", "consistency.q=1"], "consistency: q must be > 1"),
    (["init_from=START", "consistency.stages=0"], "consistency: stages must be"),
    (["init_from=/nowhere/ema.pt"], "does not exist"),
])
def test_bad_tuning_settings_name_the_setting(args, message, tmp_path):
    from hydra import compose, initialize_config_dir

    from difflab.cli import _hydra, train
    from difflab.training.checkpoint import CheckpointError

    start = tmp_path / "ema.pt"
    torch.save({}, start)  # never read: every case stops at its setting first
    args = [a.replace("START", str(start)) for a in args]
    _hydra.setup()
    with initialize_config_dir(config_dir=str(_hydra.config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=mnist5k_ect", *TINY, f"paths.output_dir={tmp_path / 'run'}",
                                          f"paths.root_dir={tmp_path}", *args])
    with pytest.raises((ValueError, CheckpointError), match=message):
        train.build(cfg)
