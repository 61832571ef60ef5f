"""The LightningModule, the EMA callback and resuming, in-process on tiny digits runs."""

import lightning.pytorch as pl
import pytest
import torch

from difflab.data import ImageDataModule
from difflab.diffusion.samplers import DDIMSampler
from difflab.diffusion.schedule import NoiseSchedule
from difflab.models import UNet
from difflab.training.callbacks import ExportEMA, LastCheckpoint, SampleGrid
from difflab.training.ema import EMA, ema_module
from difflab.training.module import DiffusionModule


def _module(**kw):
    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
               num_groups=4, image_size=8)
    config = {"model": {"in_channels": 1, "image_size": 8}}
    return DiffusionModule(net, NoiseSchedule("cosine", 100), DDIMSampler(steps=5),
                           lr=2e-3, warmup_steps=4, run_config=config, **kw)


def _trainer(tmp_path, callbacks, max_steps=6, **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
                      enable_checkpointing=False, callbacks=callbacks, default_root_dir=tmp_path, **kw)


def _data():
    return ImageDataModule(name="digits", batch_size=32)


class _Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.register_buffer("fixed", torch.arange(4.0), persistent=False)

    def training_step(self, batch, batch_idx):
        self.fixed += 1  # a buffer that changes: EMA must copy it, never average it
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ema_follows_the_warmed_up_decay_exactly(tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 3)), batch_size=8)
    ema, seen = EMA(decay=0.9, warmup=True), []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(module.layer.weight.detach().clone())

    model = _Linear()
    trainer = _trainer(tmp_path, [Record(), ema], max_steps=5)
    trainer.fit(model, data)
    weights = seen[1:] + [model.layer.weight.detach()]  # weights after each optimizer step
    expected = weights[0].clone()  # the first update copies
    for n, w in enumerate(weights[1:], start=1):
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * w
    assert torch.allclose(ema.averaged_module.layer.weight, expected, atol=1e-6)
    assert not torch.allclose(ema.averaged_module.layer.weight, model.layer.weight)
    assert torch.equal(ema.averaged_module.fixed, model.fixed)  # copied, not averaged


def test_ema_rejects_a_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.5)


def test_fit_keeps_raw_weights_live_and_exports_ema(tmp_path):
    module, ema = _module(), EMA(decay=0.9)
    export = ExportEMA(path=str(tmp_path / "ema.pt"), every_n_epochs=1)
    grid = SampleGrid(every_n_epochs=1, num_samples=4, nrow=2, dirpath=str(tmp_path / "samples"))
    trainer = _trainer(tmp_path, [ema, export, grid], max_steps=8)
    trainer.fit(module, datamodule=_data())
    exported = torch.load(tmp_path / "ema.pt", weights_only=True)["state_dict"]
    averaged = ema_module(trainer, module)
    assert averaged is not module
    for name, value in averaged.net.state_dict().items():
        assert torch.equal(exported[name], value)
    assert any(not torch.equal(v, module.net.state_dict()[k]) for k, v in exported.items())
    assert [p.name for p in grid.paths] == ["epoch_0000.png"]  # max_steps still closes epoch 0; no second grid
    assert not any(k.startswith("schedule.") for k in module.state_dict())


def test_warmup_then_cosine_learning_rate(tmp_path):
    module = _module(lr_schedule="cosine", min_lr_ratio=0.1)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, [Record()], max_steps=20).fit(module, datamodule=_data())
    assert lrs[:4] == pytest.approx([2e-3 * k / 4 for k in range(1, 5)])
    assert lrs[-1] < lrs[4] and lrs[-1] >= 2e-4 * 0.999
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_resume_restores_step_ema_and_optimizer(tmp_path):
    ckpt = LastCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=100)  # written by train end only
    first_ema = EMA(decay=0.9)
    _trainer(tmp_path, [first_ema, ckpt], max_steps=6).fit(_module(), datamodule=_data())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 6 and saved["callbacks"]["EMA"]["updates"] == 6

    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]  # no temp file left

    resumed, ema = _module(), EMA(decay=0.9)
    probe = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            probe["step"] = trainer.global_step
            probe["updates"] = ema._updates
            probe["ema"] = {k: v.clone() for k, v in ema.averaged_module.net.state_dict().items()}
            probe["raw"] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}

    trainer = _trainer(tmp_path, [ema, Probe()], max_steps=8)
    trainer.fit(resumed, datamodule=_data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert probe["step"] == 6 and probe["updates"] == 6
    for name, value in probe["ema"].items():
        assert torch.equal(value, saved["state_dict"][f"net.{name}"])
    for name, value in probe["raw"].items():
        assert torch.equal(value, saved["current_model_state"][f"net.{name}"])
    assert trainer.global_step == 8


def test_sample_is_deterministic_for_a_seed_and_in_range():
    module = _module()
    a = module.sample(3, generator=torch.Generator().manual_seed(1))
    b = module.sample(3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b)
    assert a.min() >= -1 - 1e-5 and a.max() <= 1 + 1e-5


def test_sample_without_run_config_takes_the_shape_from_the_net_and_counts_calls():
    from difflab.diffusion import CallCounter

    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
               num_groups=4, image_size=8)
    module = DiffusionModule(net, NoiseSchedule("cosine", 100), DDIMSampler(steps=5))
    with CallCounter(net) as counter:
        images = module.sample(2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and counter.calls == 5
    module.sample(2)  # the hook is gone after the with block
    assert counter.calls == 5
    shapeless = DiffusionModule(UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(),
                                     mid_attention=False, num_groups=4), NoiseSchedule("cosine", 100),
                                DDIMSampler(steps=5))
    with pytest.raises(ValueError, match="image shape unknown"):
        shapeless.sample(1)
