"""The first stage's pieces: AutoencoderKL, its posterior, its training module and its file."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from difflab.models.autoencoder import AutoencoderKL, DiagonalGaussian, PatchDiscriminator
from difflab.training.autoencoder import AutoencoderModule, ReconstructionProbe
from difflab.training.autoencoder_callbacks import autoencoder_payload
from difflab.training.checkpoint import CheckpointError, load_autoencoder, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kwargs):
    args = dict(in_channels=1, image_size=8, latent_channels=2, base_channels=8, channel_mults=(1, 2), num_groups=4)
    return AutoencoderKL(**{**args, **kwargs})


def test_latent_shape_follows_the_levels():
    assert AutoencoderKL(in_channels=1, image_size=28).latent_shape == (4, 7, 7)
    ae = tiny()
    recon, posterior = ae(torch.randn(3, 1, 8, 8))
    assert recon.shape == (3, 1, 8, 8) and posterior.mean.shape == (3, 2, 4, 4) == (3, *ae.latent_shape)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 10, "channel_mults": (1, 2, 2)}, "not divisible by the downsampling factor 4"),
    ({"in_channels": None}, "needs in_channels and image_size"),
    ({"latent_channels": 0}, "latent_channels=0"),
    ({"base_channels": 6}, "not divisible by num_groups=4"),
])
def test_bad_shapes_are_refused_with_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_config_rebuilds_the_same_network():
    ae = tiny(mid_attention=True)
    again = AutoencoderKL(**ae.config())
    again.load_state_dict(ae.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(again.decode(again.encode(x).mean), ae.decode(ae.encode(x).mean))


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                                 torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(DiagonalGaussian(mean, logvar).kl(), expected)


def test_posterior_samples_have_its_mean_and_std():
    posterior = DiagonalGaussian(torch.full((20000,), 1.5), torch.full((20000,), math.log(0.25)))
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 1.5) < 0.02 and abs(z.std().item() - 0.5) < 0.02


def _fit(module, images, steps):
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=16, shuffle=True)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, loader)
    return trainer


def _digits(n=64):
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 8.0 - 1.0
    return images


def test_training_lowers_the_reconstruction_error():
    torch.manual_seed(0)
    images = _digits()
    module = AutoencoderModule(tiny(), lr=3e-3, lr_schedule="constant")
    before = module.reconstruction_error(module.reconstruct(images), images).mean()
    _fit(module, images, 60)
    after = module.reconstruction_error(module.reconstruct(images), images).mean()
    assert after < 0.5 * before


def test_adversarial_steps_count_once_and_train_the_discriminator_on_its_own_loss():
    torch.manual_seed(0)
    images = _digits(32)
    disc = PatchDiscriminator(in_channels=1, width=8, num_layers=1, num_groups=4)
    module = AutoencoderModule(tiny(), disc, disc_start=2, lr=1e-3)
    start = [p.detach().clone() for p in disc.parameters()]
    calls = []
    original = module.manual_backward

    def grads(params):
        return [None if p.grad is None else p.grad.clone() for p in params]

    def spy(loss, *args, **kwargs):  # what each backward finds and leaves
        before = (grads(module.net.parameters()), grads(disc.parameters()))
        original(loss, *args, **kwargs)
        calls.append((before, (grads(module.net.parameters()), grads(disc.parameters()))))

    module.manual_backward = spy
    trainer = _fit(module, images, 4)
    assert trainer.global_step == 4  # one optimizer step per batch, adversarial or not
    # Steps 0-1: one backward, the autoencoder's. Steps 2-3: the generator loss, then the discriminator's.
    assert len(calls) == 6
    for before, after in calls[:2]:
        assert all(g is None for g in after[1])
    for generator_call, disc_call in (calls[2:4], calls[4:6]):
        (_, disc_before), _ = disc_call
        assert all(g is None for g in disc_before)  # the generator loss's gradients were dropped
        (ae_before, _), (ae_after, disc_after) = disc_call
        assert all(torch.equal(a, b) for a, b in zip(ae_before, ae_after))  # D's loss does not reach the AE
        assert all(g is not None for g in disc_after)
    assert any(not torch.equal(a, b) for a, b in zip(start, disc.parameters()))


def test_adaptive_weight_balances_the_two_gradients():
    module = AutoencoderModule(tiny(), PatchDiscriminator(in_channels=1, width=8, num_layers=1, num_groups=4))
    x = _digits(8)
    recon, _ = module.net(x)
    rec = module.reconstruction_error(recon, x).mean()
    gen = -module.discriminator(recon).mean()
    weight = module.adaptive_weight(rec, gen)
    last = module.net.decoder.last_layer
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
    g_gen = torch.autograd.grad(weight * gen, last)[0].norm()
    assert abs(g_gen.item() - g_rec.item()) < 1e-3 * g_rec.item()


def test_bad_loss_settings_are_refused():
    with pytest.raises(ValueError, match="rec_loss='l3'"):
        AutoencoderModule(tiny(), rec_loss="l3")
    with pytest.raises(ValueError, match="kl_weight"):
        AutoencoderModule(tiny(), kl_weight=-1.0)


def test_probe_times_the_reconstruction():
    ae = tiny()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(ReconstructionProbe(ae)(x, torch.zeros(2)).shape, x.shape)


def test_autoencoder_file_round_trip_and_its_errors(tmp_path):
    module = AutoencoderModule(tiny(), run_config={"data": {"name": "digits"}})
    path = tmp_path / "autoencoder.pt"
    torch.save(autoencoder_payload(module), path)
    loaded, data = load_autoencoder(path)
    assert data == {"name": "digits", "path": None, "image_size": 8, "channels": 1}
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.decode(loaded.encode(x).mean), module.net.decode(module.net.encode(x).mean))
    # an autoencoder is not a diffusion model, and the other way round
    with pytest.raises(CheckpointError, match="is an autoencoder"):
        read_checkpoint(path)
    other = tmp_path / "ema.pt"
    torch.save({"format": "difflab.ema/1", "state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="is a diffusion model's checkpoint"):
        load_autoencoder(other)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="could not read"):
        load_autoencoder(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_autoencoder(tmp_path / "missing.pt")
