"""`precision: auto` for sampling (difflab-sample, difflab-evaluate, the FID callback): the
forward-only probe's decision both ways, its own cache, the autocast wrapper, bad values."""

import pytest
import torch

from difflab.models import UNet
from difflab.training import precision as P
from difflab.training.fid import FID
from difflab.diffusion.guidance import ClassifierFreeGuidance
from difflab.training.inference_precision import (INFER_PROBE_BATCH, AutocastNetwork, in_sampling_setting,
                                                  resolve_inference, time_forward)

SHAPE = (32, 1, 8, 8)


def tiny_net(num_classes=None):
    torch.manual_seed(0)
    return UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
                num_groups=4, image_size=8, num_classes=num_classes).eval()


def timer_from(rates):
    def timer(net, shape, candidate, cond=None, fp32_first=None):
        seconds = shape[0] / rates[candidate.name]
        return seconds, seconds
    return timer


FAST = {"32-true/contiguous": 100.0, "32-true/channels_last": 110.0, "bf16-mixed/channels_last": 300.0}
SLOW = {"32-true/contiguous": 100.0, "32-true/channels_last": 90.0, "bf16-mixed/channels_last": 110.0}


@pytest.mark.parametrize("rates, expected", [(FAST, ("bf16-mixed", True)), (SLOW, ("32-true", False))])
def test_the_forward_probe_decides_both_ways_and_caches_apart_from_training(rates, expected, tmp_path):
    decision = resolve_inference("auto", "cpu", tiny_net(), SHAPE, cache_dir=tmp_path, timer=timer_from(rates),
                                 bf16_check=lambda: 3.0)
    assert (decision.precision, decision.channels_last) == expected
    assert [p.name.split("-")[0] for p in (tmp_path / "precision").iterdir()] == ["infer"]
    assert P.cache_path(tmp_path, tiny_net(), SHAPE, "infer", INFER_PROBE_BATCH).is_file()


def test_explicit_and_cuda_settings_need_no_probe():
    def no_timer(*args, **kwargs):
        raise AssertionError("probed")
    assert resolve_inference("32-true", "cpu", tiny_net(), SHAPE, channels_last=False, timer=no_timer).precision == \
        "32-true"
    if not torch.cuda.is_available():  # the rule does not look at a device it cannot use
        assert resolve_inference("auto", "cuda", tiny_net(), SHAPE, timer=no_timer).precision in ("bf16-mixed",
                                                                                                    "16-mixed")


def test_one_real_forward_probe_times_every_candidate():
    first, steady = time_forward(tiny_net(), SHAPE, P.BF16_CL)
    assert 0 < steady <= first * 10


def test_the_autocast_wrapper_runs_the_network_in_bf16_and_hands_attributes_through():
    net = tiny_net(num_classes=10)
    decision = P.Decision("bf16-mixed", True, {}, "cpu", "requested")
    wrapped = AutocastNetwork.wrap(net, decision)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 10)
    out = wrapped(x, t, torch.arange(4))
    assert out.dtype == torch.bfloat16 and wrapped.num_classes == 10 and wrapped.image_size == 8
    assert torch.allclose(out.float(), net(x, t, torch.arange(4)), atol=0.05)
    plain = P.Decision("32-true", False, {}, "cpu", "requested")
    assert AutocastNetwork.wrap(net, plain) is net


def test_bad_values_name_the_key():
    with pytest.raises(P.PrecisionError, match="callbacks.fid.precision='fp8' is not a precision"):
        FID(precision="fp8")
    with pytest.raises(P.PrecisionError, match="precision='half'"):
        resolve_inference("half", "cpu", tiny_net(), SHAPE)


@pytest.mark.parametrize("batch, probed", [(250, INFER_PROBE_BATCH), (32, 32)])
def test_the_sampling_probe_runs_at_the_samplers_batch_not_trainings_small_one(batch, probed, tmp_path):
    seen = []

    def timer(net, shape, candidate, cond=None, fp32_first=None):
        seen.append(shape[0])
        return 0.01, 0.01
    resolve_inference("auto", "cpu", tiny_net(), (batch, 1, 8, 8), cache_dir=tmp_path, timer=timer,
                      bf16_check=lambda: 3.0)
    assert set(seen) == {probed} and probed > P.PROBE_BATCH
    assert P.cache_path(tmp_path, tiny_net(), (batch, 1, 8, 8), "infer", INFER_PROBE_BATCH).is_file()
    # a cache written by the small training-sized probe is not read for sampling
    assert not P.cache_path(tmp_path, tiny_net(), (batch, 1, 8, 8), "infer").is_file()


def test_a_latent_models_decoder_runs_in_the_setting_its_network_samples_in():
    seen = []

    def decode(latents):
        seen.append((torch.is_autocast_enabled("cpu"), latents.is_contiguous(memory_format=torch.channels_last)))
        return torch.nn.functional.conv2d(latents, torch.ones(1, 4, 1, 1))
    z = torch.randn(2, 4, 7, 7)
    plain = tiny_net(num_classes=10)
    assert in_sampling_setting(decode, plain) is decode  # fp32 contiguous: nothing to change
    wrapped = AutocastNetwork.wrap(plain, P.Decision("bf16-mixed", True, {}, "cpu", "requested"))
    for net in (wrapped, ClassifierFreeGuidance(wrapped, 10, 3.0)):
        images = in_sampling_setting(decode, net)(z)
        assert images.dtype == torch.float32 and seen[-1] == (True, True)
        assert torch.allclose(images, z.sum(1, keepdim=True), rtol=0.02, atol=0.05)  # the same decoder
