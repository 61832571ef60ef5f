"""Classifier-free guidance: the wrapper's algebra, condition dropout, and a conditional run."""

import lightning.pytorch as pl
import pytest
import torch

from difflab.data import ImageDataModule
from difflab.diffusion import Denoiser, NoiseSchedule
from difflab.diffusion.guidance import ClassifierFreeGuidance, drop_labels
from difflab.diffusion.samplers import DDIMSampler
from difflab.models import UNet
from difflab.training.callbacks import SampleGrid
from difflab.training.module import DiffusionModule


def _net(num_classes=10):
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), num_groups=4,
               num_classes=num_classes, image_size=8)
    for p in net.parameters():  # the zero-initialised output would make every prediction equal
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([3, 10, 500, 999]), torch.tensor([0, 3, 7, 9])


@torch.no_grad()
def test_scale_zero_is_unconditional_and_one_is_conditional(inputs):
    x, t, labels = inputs
    net = _net()
    unconditional, conditional = net(x, t, None), net(x, t, labels)
    assert not torch.allclose(unconditional, conditional)
    assert torch.allclose(ClassifierFreeGuidance(net, 10, 0.0)(x, t, labels), unconditional, atol=1e-6)
    assert torch.allclose(ClassifierFreeGuidance(net, 10, 1.0)(x, t, labels), conditional, atol=1e-6)
    guided = ClassifierFreeGuidance(net, 10, 3.0)(x, t, labels)  # one call on a doubled batch
    assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@torch.no_grad()
def test_guiding_the_raw_output_guides_every_prediction(inputs, objective):
    x, t, labels = inputs
    net, schedule = _net(), NoiseSchedule("cosine", 1000)
    eps_c = Denoiser(net, schedule, objective).eps(x, t, labels)
    eps_u = Denoiser(net, schedule, objective).eps(x, t, None)
    guided = Denoiser(ClassifierFreeGuidance(net, 10, 2.5), schedule, objective).eps(x, t, labels)
    assert torch.allclose(guided, eps_u + 2.5 * (eps_c - eps_u), atol=1e-4)


def test_guidance_on_an_unconditional_network_is_a_clear_error():
    with pytest.raises(ValueError, match="unconditional.*guidance=none"):
        ClassifierFreeGuidance(_net(num_classes=None), None, 3.0)
    with pytest.raises(ValueError, match="scale"):
        ClassifierFreeGuidance(_net(), 10, -1.0)


def test_condition_dropout_rate_and_null_index():
    labels = torch.randint(0, 10, (20_000,))
    dropped = drop_labels(labels, 10, 0.1, generator=torch.Generator().manual_seed(0))
    null = dropped == 10
    assert 0.09 < null.float().mean() < 0.11
    assert torch.equal(dropped[~null], labels[~null])
    assert torch.equal(drop_labels(labels, 10, 0.0), labels)


def test_conditional_module_trains_and_samples_one_class_per_row(tmp_path):
    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), num_groups=4,
               num_classes=10, image_size=8)
    module = DiffusionModule(net, NoiseSchedule("cosine", 100), DDIMSampler(steps=4), lr=2e-3,
                             guidance_scale=2.0, run_config={"model": {"in_channels": 1, "image_size": 8}})
    seen = []
    original = module.loss

    def spy(images, cond=None, generator=None, train=False):
        seen.append(cond)
        return original(images, cond, generator, train)

    module.loss = spy
    grid = SampleGrid(every_n_epochs=1, num_samples=8, nrow=4, dirpath=str(tmp_path))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         callbacks=[grid])
    trainer.fit(module, datamodule=ImageDataModule(name="digits", batch_size=64))
    assert all(c is not None and c.max() <= 10 for c in seen)  # labels reach the loss, null allowed
    assert torch.equal(grid.labels(module), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert (tmp_path / "epoch_0000.png").is_file()


@pytest.mark.parametrize("name,kwargs", [("ddpm", {"steps": 10}), ("ddim", {"steps": 5}), ("euler", {"steps": 5}),
                                         ("heun", {"steps": 4}), ("dpmpp", {"steps": 5}),
                                         ("pc", {"steps": 5, "corrector_steps": 1})])
@torch.no_grad()
def test_every_sampler_samples_a_guided_unet(name, kwargs):
    """Any sampler drives the real U-Net through the one Denoiser, guided; scale changes the result."""
    from difflab.diffusion.samplers import build_sampler

    net, schedule = _net(), NoiseSchedule("cosine", 100)
    sampler, labels = build_sampler(name, **kwargs), torch.tensor([1, 2, 3])
    out = {}
    for scale in (1.0, 4.0):
        denoiser = Denoiser(ClassifierFreeGuidance(net, 10, scale), schedule, "v")
        out[scale] = sampler.sample(denoiser, schedule, (3, 1, 8, 8), cond=labels,
                                    generator=torch.Generator().manual_seed(0))
        assert out[scale].shape == (3, 1, 8, 8) and torch.isfinite(out[scale]).all()
    assert not torch.allclose(out[1.0], out[4.0])
