"""A NaN or infinite training loss: stop before the update (nothing written so far is spoiled),
or skip that update; both name the step and the last finite loss."""

from __future__ import annotations

import pytest
import torch

from difflab.training.nonfinite import NonFiniteGuard, NonFiniteLossError


def test_guard_passes_finite_losses_and_names_the_last_one():
    guard = NonFiniteGuard("stop")
    assert guard.check(torch.tensor(0.5), 0) is not None and guard.check(torch.tensor(0.25), 1) is not None
    with pytest.raises(NonFiniteLossError, match=r"nan at step 2; the last finite loss was 0.25 at step 1"):
        guard.check(torch.tensor(float("nan")), 2)
    with pytest.raises(NonFiniteLossError, match="no finite loss before it"):
        NonFiniteGuard("stop").check(torch.tensor(float("inf")), 0)


def test_guard_skips_until_too_many_in_a_row():
    guard = NonFiniteGuard("skip", max_skips=2)
    assert guard.check(torch.tensor(float("nan")), 0) is None and guard.check(torch.tensor(1.0), 1) is not None
    assert guard.check(torch.tensor(float("nan")), 2) is None and guard.check(torch.tensor(float("nan")), 3) is None
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        guard.check(torch.tensor(float("nan")), 4)
    assert guard.skipped == 3
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        NonFiniteGuard("ignore")


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_step_never_reaches_the_weights(policy, tmp_path):
    import lightning.pytorch as pl

    from difflab.data import ImageDataModule
    from difflab.diffusion import NoiseSchedule
    from difflab.diffusion.samplers import DDIMSampler
    from difflab.models import UNet
    from difflab.training.ema import EMA
    from difflab.training.module import DiffusionModule

    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
               num_groups=4, image_size=8)
    module = DiffusionModule(net, NoiseSchedule("cosine", 100), DDIMSampler(steps=5), lr=2e-3, nonfinite=policy,
                             run_config={"model": {"in_channels": 1, "image_size": 8}})
    loss = module.loss

    def poisoned(images, cond=None, generator=None, train=False):  # step 3's loss is NaN
        value = loss(images, cond, generator, train)
        return value * float("nan") if train and module.global_step == 3 else value

    module.loss = poisoned
    seen = {}

    class Before(pl.Callback):  # the weights just before the bad step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                seen.update({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         enable_checkpointing=False, callbacks=[EMA(decay=0.9), Before()], default_root_dir=tmp_path)
    data = ImageDataModule(name="digits", batch_size=32)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="at step 3; the last finite loss was .* at step 2"):
            trainer.fit(module, datamodule=data)
        state = module.net.state_dict()
        assert all(torch.equal(state[k], seen[k]) for k in state)  # stopped before the update
    else:
        trainer.fit(module, datamodule=data)
        assert module.nonfinite.skipped == 1 and trainer.global_step == 6  # six updates, from seven batches
        assert all(torch.isfinite(v).all() for v in module.net.state_dict().values())
