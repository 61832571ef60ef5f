"""The conditioning mechanism (embedders -> conditioner -> U-Net) and the trained restoration
tasks built on it (SR3-style super-resolution, Palette-style inpainting)."""

import pytest
import torch
from torch import nn

from difflab.diffusion.degradation import Downsample, Inpaint, make_keep
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.samplers import DDIMSampler
from difflab.diffusion.schedule import NoiseSchedule
from difflab.models import UNet
from difflab.models.conditioning import ClassEmbedder, ConditionError, Conditioner, ImageConcat
from difflab.training.module import DiffusionModule
from difflab.training.tasks import Inpainting, SuperResolution, TrainedRestoration

pytestmark = pytest.mark.usefixtures("one_thread")


def conditioner():
    return Conditioner([ImageConcat("low_res", 1, noise_aug=0.3, embed_dim=16), ImageConcat("keep", 1, p_drop=0.5),
                        ClassEmbedder(10, dim=8)])


def inputs(batch=6, size=8):
    g = torch.Generator().manual_seed(0)
    return {"low_res": torch.randn(batch, 1, size, size, generator=g), "keep": torch.ones(batch, 1, size, size),
            "label": torch.arange(batch) % 10}


def test_parts_are_routed_by_kind_in_embedder_order():
    cond = conditioner().eval()
    x = torch.zeros(6, 1, 8, 8)
    parts = cond(inputs(), x)
    assert cond.sizes() == {"concat": 2, "vector": 16 + 8, "tokens": 0}
    assert parts["concat"].shape == (6, 2, 8, 8) and parts["vector"].shape == (6, 24)
    assert torch.equal(parts["concat"][:, 1:], torch.ones(6, 1, 8, 8))  # eval: no dropout, eval_noise 0
    assert torch.equal(parts["concat"][:, :1], inputs()["low_res"])
    dropped = cond(inputs(), x, drop_all=True)
    assert dropped["concat"].abs().sum() == 0 and dropped["vector"].abs().sum() == 0
    assert cond({}, x, drop_all=True)["concat"].shape == (6, 2, 8, 8)  # no inputs needed to drop them


def test_condition_dropout_is_per_embedder_and_training_only():
    cond = conditioner().train()
    keep = cond(inputs(batch=4000, size=2), torch.zeros(4000, 1, 2, 2))["concat"][:, 1]
    kept = (keep.flatten(1).sum(1) > 0).float().mean().item()
    assert abs(kept - 0.5) < 0.04  # p_drop 0.5 on "keep"
    noisy = cond(inputs(batch=64), torch.zeros(64, 1, 8, 8))
    assert not torch.equal(noisy["concat"][:, :1], inputs(batch=64)["low_res"])  # noise augmentation in training


def test_bad_condition_dicts_say_what_is_wrong():
    cond = conditioner().eval()
    x = torch.zeros(6, 1, 8, 8)
    with pytest.raises(ConditionError, match=r"lacks \['label'\]"):
        cond({k: v for k, v in inputs().items() if k != "label"}, x)
    with pytest.raises(ConditionError, match="has 3 entries for a batch of 6"):
        cond({**inputs(), "label": torch.arange(3)}, x)
    with pytest.raises(ConditionError, match="concatenated conditions must match"):
        cond({**inputs(), "keep": torch.ones(6, 1, 4, 4)}, x)
    with pytest.raises(ConditionError, match="must be images"):
        cond({**inputs(), "keep": torch.ones(6, 2, 8, 8)}, x)
    with pytest.raises(ValueError, match="two embedders read the same input key"):
        Conditioner([ImageConcat("a"), ImageConcat("a")])


def test_unet_reads_every_kind_and_drops_to_zeros():
    net = UNet(1, base_channels=16, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
               conditioner=conditioner()).eval()
    for conv in net.modules():  # the zero-initialised convolutions would hide the embedding at init
        if isinstance(conv, nn.Conv2d) and not conv.weight.any():
            nn.init.normal_(conv.weight, std=0.1)
    x, t = torch.randn(6, 1, 8, 8), torch.full((6,), 500)
    with torch.no_grad():
        base = net(x, t, inputs())
        other = dict(inputs(), low_res=-inputs()["low_res"])
        assert not torch.allclose(base, net(x, t, other))  # the concat part is read
        assert not torch.allclose(base, net(x, t, dict(inputs(), label=(inputs()["label"] + 1) % 10)))  # vector
        assert net(x, t, None).shape == (6, 1, 8, 8)
    assert net.conv_in.in_channels == 3
    with pytest.raises(ValueError, match="pass cond as a dict"):
        net(x, t, torch.arange(6))


def test_super_resolution_task_builds_the_upsampled_low_res_image():
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    task = SuperResolution(factor=4, upsample="nearest")
    low = task.inputs(images)["low_res"]
    assert low.shape == images.shape and torch.allclose(Downsample(4).A(low), Downsample(4).A(images), atol=1e-6)
    bicubic = SuperResolution(factor=4).inputs(images)["low_res"]
    assert bicubic.shape == images.shape and bicubic.abs().max() <= 1


def test_inpainting_task_mixes_masks_and_zeroes_the_hole():
    task = Inpainting(image_size=28, masks=("center", "strokes"), bank=16, seed=3)
    assert torch.equal(task.bank, Inpainting(image_size=28, masks=("center", "strokes"), bank=16, seed=3).bank)
    images = torch.rand(64, 1, 28, 28) + 0.5  # no pixel is 0 by chance
    cond = task.inputs(images, torch.Generator().manual_seed(0))
    keep, masked = cond["keep"].bool(), cond["masked"]
    assert torch.equal(masked[keep], images[keep]) and (masked[~keep] == 0).all()
    assert len({tuple(k.flatten().tolist()) for k in keep}) > 2  # several different masks in one batch
    with pytest.raises(ValueError, match="must be one of"):
        Inpainting(masks=("centre",))


def tiny_conditioned_net(channels=2):
    embedders = [ImageConcat("keep", 1), ImageConcat("masked", 1)] if channels == 2 else [ImageConcat("low_res", 1)]
    return UNet(1, base_channels=16, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
                image_size=8, conditioner=Conditioner(embedders))


def test_the_module_trains_with_a_task_and_refuses_one_without_a_conditioner():
    schedule = NoiseSchedule("cosine", 1000)
    module = DiffusionModule(tiny_conditioned_net(1), schedule, DDIMSampler(steps=4), prediction="v",
                             task=SuperResolution(factor=2), channels_last=False)
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    _, cond = module._batch((images, torch.zeros(8, dtype=torch.long)), train=True)
    loss = module.loss(images, cond, train=True)
    loss.backward()
    assert torch.isfinite(loss) and module.net.conv_out.weight.grad.abs().sum() > 0  # (zero-init: grads start there)
    with pytest.raises(ValueError, match="has no conditioner"):
        DiffusionModule(UNet(1, base_channels=16, channel_mults=(1,), attention_levels=()), schedule,
                        DDIMSampler(steps=4), task=SuperResolution(factor=2))


def test_trained_restoration_keeps_known_pixels_and_checks_the_factor():
    schedule = NoiseSchedule("cosine", 1000)
    truth = torch.rand(4, 1, 8, 8) * 2 - 1
    operator = Inpaint(make_keep("center", 8, box=4))
    net = tiny_conditioned_net(2).eval()
    nn.init.normal_(net.conv_out.weight, std=0.1)
    palette = TrainedRestoration(Inpainting(image_size=8))
    out = palette.restore(Denoiser(net, schedule, "v"), schedule, DDIMSampler(steps=5), operator, operator.A(truth),
                          truth.shape, generator=torch.Generator().manual_seed(0))
    assert (out - truth)[:, :, operator.keep[0, 0]].abs().max().item() == 0.0
    sr3 = TrainedRestoration(SuperResolution(factor=2))
    with pytest.raises(ValueError, match="trained for x2 super-resolution"):
        sr3.restore(Denoiser(tiny_conditioned_net(1), schedule, "v"), schedule, DDIMSampler(steps=5), Downsample(4),
                    torch.zeros(4, 1, 2, 2), truth.shape)
    regression = TrainedRestoration(SuperResolution(factor=2), regression=True)
    assert regression.method == "regression" and regression.network_calls(50) == 1
