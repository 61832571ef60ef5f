"""Power-function EMA and post-hoc EMA (EDM2): the exponent, the least-squares reconstruction, the
callback's snapshots and difflab-ema-sweep end to end."""

import csv
import sys

import pytest
import torch

from difflab.training.ema import EMA
from difflab.training.posthoc_ema import (gamma_to_std, posthoc_coefficients, power_beta, read_snapshots,
                                          reconstruct, std_to_gamma)

import warm_process


def test_std_and_gamma_are_inverse_and_match_edm2():
    # EDM2 (sec. 3.1): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> gamma 6.94
    assert std_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert std_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for std in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert gamma_to_std(std_to_gamma(std)) == pytest.approx(std, rel=1e-9)
    for bad in (0.0, -0.1, 0.3, 1.0):
        with pytest.raises(ValueError, match="EMA length"):
            std_to_gamma(bad)


def power_ema(trajectory, gamma, upto):
    average = trajectory[0].clone()
    for t in range(2, upto + 1):
        beta = power_beta(gamma, t)
        average = beta * average + (1 - beta) * trajectory[t - 1]
    return average


def test_any_ema_length_is_reconstructed_from_two_tracked_ones():
    """Snapshots of the 0.05 and 0.10 power EMAs of a weight trajectory, every 125 of 2,000 steps;
    the least-squares combination equals the directly computed EMA of another length."""
    steps = 2000
    generator = torch.Generator().manual_seed(0)
    drift = torch.sin(torch.arange(steps, dtype=torch.float64)[:, None] / torch.tensor([150.0, 400.0, 60.0]))
    trajectory = drift + 0.1 * torch.randn(steps, 3, generator=generator, dtype=torch.float64).cumsum(0)
    snapshots = []
    for std in (0.05, 0.10):
        gamma = std_to_gamma(std)
        for step in range(125, steps + 1, 125):
            snapshots.append({"std": std, "gamma": gamma, "step": step, "parameters": ["w"],
                              "state_dict": {"w": power_ema(trajectory, gamma, step)}})
    for target in (0.03, 0.07, 0.15):
        state, coefficients = reconstruct(snapshots, target)
        truth = power_ema(trajectory, std_to_gamma(target), steps)
        assert (state["w"] - truth).abs().max() < 0.02 * trajectory.abs().max(), (target, state["w"], truth)
        assert coefficients.sum().item() == pytest.approx(1.0, abs=0.01)
    # a tracked length at the last step is that snapshot itself
    coefficients = posthoc_coefficients([s["gamma"] for s in snapshots], [s["step"] for s in snapshots],
                                        std_to_gamma(0.10), steps)
    assert coefficients[-1].item() == pytest.approx(1.0, abs=1e-6)
    assert coefficients[:-1].abs().max().item() < 1e-6
    # an earlier step uses only the snapshots before it
    state, coefficients = reconstruct(snapshots, 0.07, step=1000)
    assert len(coefficients) == 16
    assert (state["w"] - power_ema(trajectory, std_to_gamma(0.07), 1000)).abs().max() < 0.05


def test_power_ema_callback_decays_as_edm2():
    ema = EMA(std=0.10)
    betas = []
    for _ in range(5):
        ema._updates += 1
        betas.append(ema.current_decay())
    gamma = std_to_gamma(0.10)
    assert betas == [power_beta(gamma, t) for t in range(1, 6)] and betas[0] == 0.0
    with pytest.raises(ValueError, match="EMA length"):
        EMA(std=0.5)


def _run(module, *args, cwd):
    return warm_process.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)


def test_callback_writes_evenly_spaced_snapshots_of_each_length(tmp_path):
    import lightning.pytorch as pl

    from difflab.data import ImageDataModule
    from difflab.diffusion.samplers import DDIMSampler
    from difflab.diffusion.schedule import NoiseSchedule
    from difflab.models import UNet
    from difflab.training.module import DiffusionModule
    from difflab.training.posthoc_ema import PostHocEMA

    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
               num_groups=4, image_size=8)
    module = DiffusionModule(net, NoiseSchedule("cosine", 100), DDIMSampler(steps=5), lr=2e-3,
                             run_config={"model": {"in_channels": 1, "image_size": 8}})
    callback = PostHocEMA(stds=(0.05, 0.10), snapshots=4, dirpath=str(tmp_path / "posthoc"))
    start = [p.detach().clone() for p in net.parameters()]
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         enable_checkpointing=False, callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ImageDataModule(name="digits", batch_size=32))
    snapshots = read_snapshots(tmp_path / "posthoc")
    assert [(s["std"], s["step"]) for s in snapshots] == [(std, k) for std in (0.05, 0.10) for k in (2, 4, 6, 8)]
    last = snapshots[-1]
    names = [n for n, _ in net.named_parameters()]
    assert last["parameters"] == names and last["run_config"]["model"]["image_size"] == 8
    # an average of the weights seen: between the start and the end, not either of them
    moved = [(last["state_dict"][n] - s).abs().max() for n, s in zip(names, start)]
    assert max(moved) > 0
    assert any((last["state_dict"][n] - p.detach()).abs().max() > 0 for n, p in net.named_parameters())
    state = callback.state_dict()
    restored = PostHocEMA(stds=(0.05, 0.10), snapshots=4, dirpath=str(tmp_path / "posthoc"))
    restored.load_state_dict(state)
    assert restored._updates == 8 and restored._saved == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="snapshots must be >= 1"):
        PostHocEMA(snapshots=0)


@pytest.mark.slow  # two CLI runs, a domain classifier and four sample grids: ~1 min on 2 cores
def test_snapshots_and_the_sweep_end_to_end(tmp_path):
    run = tmp_path / "run"
    proc = _run("difflab.cli.train", "experiment=digits_tiny", "trainer.max_epochs=2", "callbacks=posthoc",
                "callbacks.posthoc_ema.snapshots=4", "callbacks.progress_bar=null", "callbacks.ema.std=0.1",
                f"hydra.run.dir={run}", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    snapshots = read_snapshots(run / "checkpoints" / "posthoc")
    assert sorted({s["std"] for s in snapshots}) == [0.05, 0.10]
    steps = sorted({s["step"] for s in snapshots})
    assert len(steps) == 4 and steps[-1] == max(steps)
    out = tmp_path / "sweep"
    proc = _run("difflab.cli.ema_sweep", f"ckpt_dir={run / 'checkpoints' / 'posthoc'}", "stds=[0.05,0.2]", "n=16",
                "batch_size=16", "steps=[2]", "grid_images=0", "progress=false", f"hydra.run.dir={out}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [float(r["ema_std"]) for r in rows] == [0.05, 0.2] and all(float(r["fid"]) > 0 for r in rows)
    assert (out / "fid_vs_ema_length.png").exists()
    assert (out / "results.md").read_text().startswith("| ema_std | step | sampler")
    # the reconstructed EMA is an ema.pt: difflab-sample takes it
    proc = _run("difflab.cli.sample", f"ckpt={out / 'ema-0.200.pt'}", "n=4", "sampler=ddim", "sampler.steps=2",
                "progress=false", f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # bad input: an empty directory, an EMA length out of range
    (tmp_path / "empty").mkdir()
    proc = _run("difflab.cli.ema_sweep", f"ckpt_dir={tmp_path / 'empty'}", cwd=tmp_path)
    assert proc.returncode != 0 and "holds no post-hoc EMA snapshots" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("difflab.cli.ema_sweep", f"ckpt_dir={run / 'checkpoints' / 'posthoc'}", "stds=[0.5]", cwd=tmp_path)
    assert proc.returncode != 0 and "stds=" in proc.stderr and "Traceback" not in proc.stderr
