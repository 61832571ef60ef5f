"""Latent diffusion end to end: an autoencoder run, a diffusion run in its latent space
(first_stage=kl), and difflab-sample / difflab-evaluate decoding what they draw."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from difflab.cli import _hydra, schema
from difflab.data import ImageDataModule
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.samplers import DDIMSampler
from difflab.diffusion.schedule import NoiseSchedule
from difflab.models.first_stage import LatentSpace
from difflab.training.checkpoint import CheckpointError, read_checkpoint
from difflab.training.first_stage import build_latent_space, cache_latents, latent_space_from_checkpoint

_hydra.setup()
CONF = Path(_hydra.config_dir())
AE_ARGS = ("experiment=mnist5k_autoencoder", "data=digits", "model.base_channels=16", "model.channel_mults=[1,2]",
           "trainer.max_epochs=3", "trainer.max_time=null", "trainer.precision=32-true", "channels_last=false",
           "callbacks.progress_bar=null", "data.batch_size=64")


def _compose(name, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def _train(root, name, *overrides):
    """In process, as test_evaluate does: the config and train() the CLI runs."""
    from difflab.cli.train import train_run

    run = root / name
    run.mkdir()
    cfg = _compose("train", [*overrides, f"paths.output_dir={run}", f"paths.root_dir={root}"])
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
            patch.delenv(key, raising=False)
        metrics, outcome = train_run(cfg)
    return run, metrics, outcome


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("latent"), "ae", *AE_ARGS)


@pytest.fixture(scope="module")
def latent_run(ae_run, tmp_path_factory):
    run, _, _ = ae_run
    return _train(tmp_path_factory.mktemp("latent"), "ldm", "experiment=digits_tiny", "first_stage=kl",
                  f"first_stage.ckpt={run}/checkpoints/autoencoder.pt", "trainer.max_epochs=2",
                  "callbacks.fid.num_samples=64", "callbacks.fid.batch_size=64", "callbacks.progress_bar=null")


def test_autoencoder_run_leaves_its_file_grids_and_scores(ae_run):
    run, metrics, outcome = ae_run
    assert outcome["status"] == "ok" and outcome["steps"] == outcome["planned_steps"]
    assert (run / "checkpoints" / "autoencoder.pt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted((run / "samples").glob("recon_*.png"))  # every 3 epochs and at the end
    for key in ("eval/psnr", "eval/ssim", "eval/class_accuracy", "eval/fid", "eval/fid_real", "val/psnr"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval/psnr"] > 15.0  # 8x8 digits through 4x4x4 latents, after 3 epochs


def test_latent_run_trains_on_latents_and_records_its_first_stage(latent_run, ae_run):
    run, metrics, outcome = latent_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["model"]["in_channels"], config["model"]["image_size"]) == (4, 4)
    assert config["first_stage"]["autoencoder"]["latent_channels"] == 4
    scale = config["first_stage"]["scale_factor"]
    assert scale > 0
    for name in ("ema.pt", "last.ckpt"):
        run_config, weights, first_stage = read_checkpoint(run / "checkpoints" / name)
        assert first_stage["scale_factor"].item() == pytest.approx(scale)
        space = latent_space_from_checkpoint(run_config, first_stage)
        assert space.latent_shape == (4, 4, 4) and space.image_shape == (1, 8, 8)
    assert math.isfinite(metrics["eval/fid"])  # the FID callback scored decoded images
    from PIL import Image

    grid = Image.open(sorted((run / "samples").glob("*.png"))[-1])
    assert grid.size == (4 * 8 + 5 * 2, 4 * 8 + 5 * 2)  # 4x4 grid of decoded 8x8 images


def test_scale_factor_gives_unit_variance_latents_on_new_draws(ae_run):
    run, _, _ = ae_run
    datamodule = ImageDataModule(name="digits", batch_size=64)
    spec = {"kind": "kl", "ckpt": str(run / "checkpoints" / "autoencoder.pt"), "scale_factor": None}
    space = build_latent_space(spec, datamodule)
    # fitted on the training split with seed 0; checked on other draws and on held-out images
    z = space.encode(datamodule.split("train").images, torch.Generator().manual_seed(1))
    assert abs(z.std().item() - 1.0) < 0.05
    z_val = space.encode(datamodule.split("val").images, torch.Generator().manual_seed(2))
    assert abs(z_val.std().item() - 1.0) < 0.05
    unscaled = space.autoencoder.encode(datamodule.split("train").images[:8]).mean
    torch.testing.assert_close(space.decode(unscaled * space.scale_factor),
                               space.autoencoder.decode(unscaled).clamp(-1, 1))


def test_latent_cache_serves_moments_while_splits_stay_images(ae_run):
    run, _, _ = ae_run
    datamodule = ImageDataModule(name="digits", batch_size=64)
    space = build_latent_space({"kind": "kl", "ckpt": str(run / "checkpoints" / "autoencoder.pt")}, datamodule)
    cache_latents(space, datamodule)
    batch, labels = next(iter(datamodule.val_dataloader()))
    assert batch.shape[1:] == (8, 4, 4)  # scaled mean and std of 4 latent channels
    assert datamodule.split("val").images.shape[1:] == (1, 8, 8)
    torch.testing.assert_close(labels, datamodule.split("val").labels[: len(labels)])
    torch.testing.assert_close(batch, space.moments(datamodule.split("val").images[: len(batch)]))
    with pytest.raises(ValueError, match="rows for the"):
        datamodule.serve(batch, batch)


def test_sample_and_evaluate_decode_a_latent_model(latent_run, tmp_path):
    from difflab.cli.evaluate import evaluate
    from difflab.cli.sample import sample

    run, _, _ = latent_run
    ckpt = run / "checkpoints" / "ema.pt"
    cfg = _compose("sample", [f"ckpt={ckpt}", "n=6", "sampler=ddim", "sampler.steps=5", "progress=false",
                              f"paths.output_dir={tmp_path / 's'}", "precision=32-true"])
    written = sample(cfg)
    images = np.load(written["npz"])["images"]
    assert images.shape == (6, 8, 8, 1)
    cfg = _compose("eval", [f"ckpt={ckpt}", "n=32", "batch_size=32", "samplers=[ddim]", "steps=[5]",
                            "progress=false", "grid_images=0", "real_baseline=false", "precision=32-true",
                            f"paths.output_dir={tmp_path / 'e'}"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # evaluate composes sampler configs
        rows = evaluate(cfg)
    assert len(rows) == 1 and math.isfinite(rows[0]["fid"])
    cfg = _compose("sample", [f"ckpt={ckpt}", "mode=inversion", f"paths.output_dir={tmp_path / 'i'}"])
    with pytest.raises(schema.ConfigError, match="mode=inversion works on pixel-space models"):
        sample(cfg)


def test_a_latent_model_samples_without_clipping_its_latents():
    schedule = NoiseSchedule("cosine", 100)

    def far(x, t, cond=None):  # an x0-predictor whose answer lies outside [-1, 1]
        return torch.full_like(x, 3.0)

    sampler = DDIMSampler(steps=5, clip_denoised=True)
    shape = (2, 1, 2, 2)
    clipped = sampler.sample(Denoiser(far, schedule, "x0"), schedule, shape, generator=torch.Generator().manual_seed(0))
    free = sampler.sample(Denoiser(far, schedule, "x0", clip_range=None), schedule, shape,
                          generator=torch.Generator().manual_seed(0))
    assert clipped.max() <= 1.0 + 1e-5 and torch.allclose(free, torch.full_like(free, 3.0), atol=1e-4)


@pytest.mark.parametrize("overrides, error, message", [
    (["first_stage=kl"], Exception, "first_stage.ckpt"),
    (["first_stage=kl", "first_stage.ckpt=missing.pt"], CheckpointError, "does not exist"),
    (["first_stage=kl", "first_stage.ckpt={ae}", "data=mnist5k"], CheckpointError,
     r"trained on 1x8x8 images \(digits\), but this run's data \(mnist5k\) gives 1x28x28"),
    (["first_stage=kl", "first_stage.ckpt={ae}", "first_stage.scale_factor=-1"], schema.ConfigError,
     "scale_factor=-1.0 must be > 0"),
    (["first_stage=kl", "first_stage.ckpt={ema}"], CheckpointError, "is a diffusion model's checkpoint"),
    (["stage=autoencoder"], schema.ConfigError, "stage=autoencoder does not train model=difflab.models.UNet"),
])
def test_bad_first_stage_settings_name_the_setting(ae_run, latent_run, tmp_path, overrides, error, message):
    from difflab.cli.train import build

    ae = ae_run[0] / "checkpoints" / "autoencoder.pt"
    ema = latent_run[0] / "checkpoints" / "ema.pt"
    overrides = [o.format(ae=ae, ema=ema) for o in overrides]
    cfg = _compose("train", ["experiment=digits_tiny", *overrides, f"paths.output_dir={tmp_path}"])
    with pytest.raises(error, match=message):
        build(cfg)


def test_first_stage_typo_is_an_error_at_composition():
    with pytest.raises(Exception, match="kidn"):
        _compose("train", ["first_stage.kidn=kl"])


def test_an_autoencoder_file_is_no_diffusion_checkpoint_for_sample(ae_run, tmp_path):
    from difflab.cli.sample import sample

    cfg = _compose("sample", [f"ckpt={ae_run[0] / 'checkpoints' / 'autoencoder.pt'}",
                              f"paths.output_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match="is an autoencoder .a first stage., not a diffusion model"):
        sample(cfg)


def test_latent_space_stays_frozen_in_train_mode():
    from difflab.models.autoencoder import AutoencoderKL

    space = LatentSpace(AutoencoderKL(in_channels=1, image_size=8, channel_mults=(1, 2), base_channels=8,
                                      num_groups=4))
    space.train()
    assert not space.autoencoder.training
    assert not any(p.requires_grad for p in space.parameters())
    assert "scale_factor" in space.state_dict()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "pc", "euler", "heun", "dpmpp"])
def test_every_sampler_draws_decoded_images_from_a_latent_model(name):
    from difflab.diffusion.samplers import SAMPLERS
    from difflab.models import UNet
    from difflab.models.autoencoder import AutoencoderKL
    from difflab.training.module import DiffusionModule

    torch.manual_seed(0)
    space = LatentSpace(AutoencoderKL(in_channels=1, image_size=8, channel_mults=(1, 2), base_channels=8,
                                      num_groups=4), scale_factor=0.7)
    net = UNet(in_channels=4, base_channels=8, channel_mults=(1,), attention_levels=(), num_groups=4, image_size=4,
               attention_head_dim=8)
    sampler = SAMPLERS[name](steps=3)
    module = DiffusionModule(net, NoiseSchedule("cosine", 100), sampler, prediction="v", channels_last=False,
                             first_stage=space, run_config={"model": {"image_size": 4, "in_channels": 4}})
    images = module.sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all() and images.abs().max() <= 1.0


def test_an_autoencoder_run_resumes_from_its_last_checkpoint(ae_run, tmp_path):
    run, _, outcome = ae_run
    resumed, _, again = _train(tmp_path, "resumed", *AE_ARGS, "trainer.max_epochs=4",
                               f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert again["status"] == "ok" and again["steps"] == outcome["steps"] * 4 // 3


def test_a_resumed_latent_run_keeps_the_first_stage_of_its_checkpoint(latent_run, ae_run, tmp_path):
    from difflab.cli.train import build
    from difflab.training.checkpoint import check_resume_compatible

    run = latent_run[0]
    saved = yaml.safe_load((run / "config.yaml").read_text())["first_stage"]["scale_factor"]
    other = tmp_path / "other_autoencoder.pt"  # the file on disk changed since: the resume must not read it
    other.write_bytes(b"not read")
    cfg = _compose("train", ["experiment=digits_tiny", "first_stage=kl", f"first_stage.ckpt={other}",
                             "trainer.max_epochs=3", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                             f"paths.output_dir={tmp_path / 'out'}"])
    module, _, _ = build(cfg)
    assert module.first_stage.scale_factor.item() == pytest.approx(saved)
    check_resume_compatible(run / "checkpoints" / "last.ckpt", module.hparams.run_config)
    pixel = _compose("train", ["experiment=digits_tiny", f"paths.output_dir={tmp_path / 'pixel'}"])
    from difflab.cli import _hydra as hydra_helpers

    with pytest.raises(CheckpointError, match="first_stage.kind"):
        check_resume_compatible(run / "checkpoints" / "last.ckpt", hydra_helpers.plain(pixel))
