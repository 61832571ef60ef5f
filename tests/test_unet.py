"""Behaviour of difflab.models.UNet: shapes, conditioning, input checks, layouts, dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.models import UNet, to_channels_last

CL = torch.channels_last


def small_unet(**overrides) -> UNet:
    """A narrow net so the tests stay fast; overrides replace any constructor argument."""
    config = dict(
        base_channels=16, channel_mults=(1, 2), attention_levels=(1,), attention_head_dim=16
    )
    config.update(overrides)
    return UNet(**config)


def randomize_zero_init(net: nn.Module, std: float = 0.05) -> nn.Module:
    """Give the zero-initialised layers random weights, so every path affects the output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in net.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return net


def batch(channels: int = 1, size: int = 16, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    return x, t


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "size", "channel_mults", "attention_levels"),
    [
        (1, None, 8, (1, 2, 4), (1,)),
        (3, None, 16, (1, 2), (1,)),
        (1, None, 28, (1, 2, 4), (1,)),
        (3, 6, 32, (1, 2, 2, 2), (2, 3)),
        (3, None, 32, (1,), ()),
    ],
)
def test_output_shape(in_channels, out_channels, size, channel_mults, attention_levels):
    net = small_unet(
        in_channels=in_channels,
        out_channels=out_channels,
        channel_mults=channel_mults,
        attention_levels=attention_levels,
    )
    x, t = batch(in_channels, size)
    out = net(x, t)
    assert out.shape == (2, out_channels or in_channels, size, size)


def test_non_square_input():
    x = torch.randn(2, 1, 8, 12)
    assert small_unet()(x, torch.tensor([1, 2])).shape == (2, 1, 8, 12)


def test_fresh_net_predicts_zero_because_output_conv_is_zero_initialised():
    x, t = batch()
    assert torch.equal(small_unet()(x, t), torch.zeros_like(x))


def test_peer_config_parameter_count_is_comparable_to_peers():
    net = UNet(in_channels=1, base_channels=32, channel_mults=(1, 2, 4), attention_levels=(1,))
    n_params = sum(p.numel() for p in net.parameters())
    assert 1.5e6 < n_params < 4e6


def test_net_has_no_buffers_so_ema_averages_only_weights():
    assert list(UNet(num_classes=10).buffers()) == []


def test_class_conditioning_changes_output_and_none_is_the_null_class():
    net = randomize_zero_init(small_unet(num_classes=10))
    assert net.class_embed.num_embeddings == 11  # 10 classes + the null class
    x, t = batch()
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        conditional = net(x, t, labels)
        unconditional = net(x, t)
        null_label = net(x, t, torch.full((2,), 10))
    assert not torch.allclose(conditional, unconditional)
    torch.testing.assert_close(unconditional, null_label)


def test_cond_on_unconditional_net_is_an_error():
    x, t = batch()
    with pytest.raises(ValueError, match="num_classes"):
        small_unet()(x, t, torch.tensor([0, 1]))


def test_cond_of_wrong_shape_is_an_error():
    x, t = batch()
    with pytest.raises(ValueError, match="cond must"):
        small_unet(num_classes=10)(x, t, torch.tensor([[1], [2]]))


def test_float_and_long_timesteps():
    net = randomize_zero_init(small_unet())
    x, _ = batch()
    with torch.no_grad():
        long_t = net(x, torch.tensor([10, 500]))
        float_t = net(x, torch.tensor([10.0, 500.0]))
        fractional_t = net(x, torch.tensor([10.4, 500.0]))
    torch.testing.assert_close(long_t, float_t)
    assert not torch.allclose(long_t, fractional_t)  # fractional t is used, not rounded


@pytest.mark.parametrize("scalar", [7, 7.0, torch.tensor(7)])
def test_scalar_timestep_is_broadcast_to_the_batch(scalar):
    net = randomize_zero_init(small_unet())
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(net(x, scalar), net(x, torch.full((2,), 7)))


def test_timesteps_of_wrong_length_are_an_error():
    x, _ = batch()
    with pytest.raises(ValueError, match="t must"):
        small_unet()(x, torch.tensor([1, 2, 3]))


def test_size_not_divisible_is_an_error_naming_size_and_divisor():
    net = UNet(channel_mults=(1, 2, 4))  # 3 levels: H and W must be multiples of 4
    with pytest.raises(ValueError, match=r"30x30.*divisible by 4") as error:
        net(torch.randn(1, 1, 30, 30), torch.tensor([1]))
    assert "image_size" in str(error.value) and "channel_mults" in str(error.value)
    with pytest.raises(ValueError, match=r"30x30.*divisible by 4"):
        UNet(channel_mults=(1, 2, 4), image_size=30)
    UNet(channel_mults=(1, 2, 4), image_size=28)  # a multiple of 4 is fine


def test_wrong_channel_count_is_an_error():
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        small_unet()(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))


def test_num_groups_must_divide_every_width():
    with pytest.raises(ValueError, match="num_groups=12"):
        UNet(base_channels=32, channel_mults=(1, 2), num_groups=12)


def test_attention_level_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(channel_mults=(1, 2), attention_levels=(2,))


def test_channels_last_gives_the_same_output_and_keeps_the_layout_throughout():
    torch.manual_seed(0)
    net = randomize_zero_init(small_unet(num_classes=3))
    x, t = batch(size=16)
    cond = torch.tensor([0, 2])
    with torch.no_grad():
        reference = net(x, t, cond)
        to_channels_last(net)
        conv_inputs_channels_last = []
        hooks = [
            module.register_forward_hook(
                lambda m, inputs, out: conv_inputs_channels_last.append(
                    inputs[0].is_contiguous(memory_format=CL)
                )
            )
            for module in net.modules()
            if isinstance(module, nn.Conv2d)
        ]
        out = net(x.contiguous(memory_format=CL), t, cond)
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
    # No layout flips: every convolution reads channels_last, and the output stays so.
    assert conv_inputs_channels_last and all(conv_inputs_channels_last)
    assert out.is_contiguous(memory_format=CL)


def test_bf16_autocast_runs_and_is_close_to_fp32():
    torch.manual_seed(0)
    net = to_channels_last(randomize_zero_init(small_unet(num_classes=3)))
    x, t = batch(size=16, n=4)
    x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        reference = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = net(x, t)
    assert low_precision.dtype == torch.bfloat16
    error = (low_precision.float() - reference).abs().max()
    assert error < 0.05 * reference.abs().max()


def test_gradients_reach_every_parameter():
    net = randomize_zero_init(small_unet(num_classes=3, dropout=0.1))
    x, t = batch()
    loss = net(x, t, torch.tensor([0, 1])).square().mean()
    loss.backward()
    no_grad = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


def test_zero_init_net_trains_its_output_layer_first():
    # With the output conv at zero only it gets a gradient at step 0; after one optimiser
    # step the rest of the network starts to learn. Guards against a dead zero-init.
    net = small_unet()
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    x, t = batch()
    for _ in range(2):
        optimiser.zero_grad()
        nn.functional.mse_loss(net(x, t), torch.randn_like(x)).backward()
        optimiser.step()
    assert net.conv_in.weight.grad is not None and net.conv_in.weight.grad.any()


def test_traces_without_graph_breaks_under_torch_compile_fullgraph():
    # The "eager" backend runs only Dynamo's tracing (no code generation), which is where
    # graph breaks and host syncs (.item(), data-dependent branches) would show up.
    net = to_channels_last(randomize_zero_init(small_unet(num_classes=3)))
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    x, t = batch()
    x = x.contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, t.float(), torch.tensor([0, 1]))
        out_null = compiled(x, t.float())
    out.float().mean().backward()
    assert out.shape == x.shape and out_null.shape == x.shape


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    kwargs = dict(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(1,), num_groups=4,
                  image_size=8)
    plain, checkpointed = UNet(**kwargs), UNet(**kwargs, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    for p in plain.parameters():  # zero-initialised output convs would hide the blocks' gradients
        torch.nn.init.normal_(p, std=0.05)
    checkpointed.load_state_dict(plain.state_dict())
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 999])
    recomputed = []
    block = checkpointed.down_blocks[0][0].res
    block.register_forward_pre_hook(lambda *args: recomputed.append(torch.is_grad_enabled()))
    outputs = []
    for net in (plain, checkpointed):
        out = net(x, t)
        out.square().mean().backward()
        outputs.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    assert len(recomputed) == 2  # forward, then again in backward: the block was recomputed
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    for a, b in zip(outputs[0][1], outputs[1][1]):
        torch.testing.assert_close(a, b)
    recomputed.clear()
    with torch.no_grad():
        checkpointed(x, t)
    assert recomputed == [False]  # no grad: nothing to recompute


def test_patch_size_folds_patches_into_channels_losslessly():
    """patch_size=2 is the same network run on pixel-unshuffled images: its weights, loaded
    into a patch_size=1 net with 4x the channels in and out, give the same prediction once
    the output is pixel-shuffled back."""
    patched = randomize_zero_init(small_unet(patch_size=2, in_channels=1))
    folded = small_unet(in_channels=4)
    folded.load_state_dict(patched.state_dict())  # same parameter shapes: conv_in 4 -> 16, conv_out 16 -> 4
    x, t = batch(channels=1, size=16, n=3)
    out = patched(x, t)
    assert out.shape == x.shape
    expected = torch.nn.functional.pixel_shuffle(folded(torch.nn.functional.pixel_unshuffle(x, 2), t), 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert patched.conv_in.in_channels == 4 and patched.conv_out.out_channels == 4


def test_patch_size_multiplies_the_size_divisor_and_is_checked():
    net = small_unet(patch_size=2)  # 2 levels x 2x2 patches: multiples of 4
    with pytest.raises(ValueError, match=r"18x18 is not divisible by 4 = patch_size"):
        net(torch.randn(1, 1, 18, 18), torch.tensor([1]))
    assert net(torch.randn(1, 1, 12, 12), torch.tensor([1])).shape == (1, 1, 12, 12)
    with pytest.raises(ValueError, match="patch_size must be an integer >= 1"):
        small_unet(patch_size=0)


def test_patch_size_with_a_concatenated_condition_and_channels_last():
    from difflab.models.conditioning import Conditioner, ImageConcat

    net = randomize_zero_init(small_unet(patch_size=2, conditioner=Conditioner([ImageConcat("low", channels=1)])))
    assert net.conv_in.in_channels == 8  # (1 image + 1 condition channel) x 4
    x, t = batch(channels=1, size=16, n=2)
    cond = {"low": torch.randn(2, 1, 16, 16)}
    out = net(x, t, cond)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, {"low": torch.zeros(2, 1, 16, 16)}))
    net_cl = to_channels_last(net)
    torch.testing.assert_close(net_cl(x.contiguous(memory_format=CL), t, cond), out, rtol=1e-4, atol=1e-5)
