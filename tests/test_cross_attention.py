"""Cross-attention to condition tokens: the layer against the formula, the key-padding mask,
and the U-Net routing a conditioner's tokens to the chosen levels."""

import math

import pytest
import torch

from difflab.models import UNet
from difflab.models import conditioning
from difflab.models.conditioning import ClassEmbedder, ClassTokens, Conditioner
from difflab.models.layers import CrossAttention

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(channels=16, context_dim=12, head_dim=8):
    torch.manual_seed(0)
    layer = CrossAttention(channels, context_dim, head_dim, num_groups=4)
    torch.nn.init.normal_(layer.to_out.weight, std=0.2)  # zero-initialised: make it matter
    return layer


def test_matches_the_attention_formula():
    layer = _layer()
    x, context = torch.randn(2, 16, 3, 3), torch.randn(2, 5, 12)
    with torch.no_grad():
        out = layer(x, context)
        q = layer.to_q(layer.norm(x).flatten(2).transpose(1, 2))  # [B, 9, 16]
        k, v = layer.to_kv(context).chunk(2, dim=-1)
        heads = []
        for h in range(layer.num_heads):
            part = slice(8 * h, 8 * (h + 1))
            weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(8), dim=-1)
            heads.append(weights @ v[..., part])
        expected = x + layer.to_out(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_padding_is_ignored_whatever_it_holds():
    layer = _layer()
    x, context = torch.randn(3, 16, 4, 4), torch.randn(3, 6, 12)
    lengths = torch.tensor([6, 2, 4])
    mask = torch.arange(6)[None] < lengths[:, None]
    with torch.no_grad():
        padded = layer(x, context, mask)
        garbage = layer(x, torch.where(mask[..., None], context, torch.randn_like(context) * 100), mask)
        for i, n in enumerate(lengths.tolist()):
            alone = layer(x[i:i + 1], context[i:i + 1, :n])  # the same sample, no padding at all
            torch.testing.assert_close(padded[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(garbage, padded, atol=1e-5, rtol=1e-5)


def test_a_row_without_real_tokens_attends_to_all_instead_of_nan():
    layer = _layer()
    x, context = torch.randn(2, 16, 2, 2), torch.randn(2, 3, 12)
    mask = torch.tensor([[False, False, False], [True, True, False]])
    with torch.no_grad():
        out = layer(x, context, mask)
        torch.testing.assert_close(out[:1], layer(x[:1], context[:1]))
    assert torch.isfinite(out).all()


def test_keeps_channels_last_and_trains_under_bf16_autocast():
    layer = _layer()
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    context = torch.randn(2, 3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, context)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def _unet(conditioner, **kwargs):
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), num_groups=4,
               attention_head_dim=8, conditioner=conditioner, **kwargs)
    torch.nn.init.normal_(net.conv_out.weight, std=0.2)  # zero-initialised: let the output show the input
    return net


def test_unet_attends_to_class_tokens_at_the_chosen_levels():
    net = _unet(Conditioner([ClassTokens(10, dim=12, p_drop=0.0)]), cross_attention_levels=[1])
    crosses = [m for m in net.modules() if isinstance(m, CrossAttention)]
    assert len(crosses) == 1 + 2 + 1  # level 1: one block down, two up; the middle (deepest level)
    for layer in crosses:
        torch.nn.init.normal_(layer.to_out.weight, std=0.2)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
    with torch.no_grad():
        a = net(x, t, {"label": torch.tensor([0, 1, 2, 3])})
        b = net(x, t, {"label": torch.tensor([0, 1, 2, 4])})
        null = net(x, t, None)
    torch.testing.assert_close(a[:3], b[:3])
    assert not torch.allclose(a[3], b[3])
    assert not torch.allclose(null, a)


def test_dropped_tokens_equal_the_unconditional_prediction():
    embedder = ClassTokens(10, dim=12, p_drop=0.999)
    net = _unet(Conditioner([embedder]), cross_attention_levels=[0, 1])
    for layer in (m for m in net.modules() if isinstance(m, CrossAttention)):
        torch.nn.init.normal_(layer.to_out.weight, std=0.2)
    x, t = torch.randn(3, 1, 8, 8), torch.randint(0, 1000, (3,))
    net.train()
    with torch.no_grad():
        dropped = net(x, t, {"label": torch.tensor([1, 2, 3])})  # p_drop ~1: every sequence zeroed
        null = net(x, t, None)
    torch.testing.assert_close(dropped, null, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients_with_tokens():
    def grads(checkpointing):
        torch.manual_seed(1)  # the token table too
        net = _unet(Conditioner([ClassTokens(10, dim=12, p_drop=0.0)]), cross_attention_levels=[1],
                    gradient_checkpointing=checkpointing)
        net(torch.ones(2, 1, 8, 8), torch.tensor([3, 500]), {"label": torch.tensor([1, 7])}).square().mean().backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("conditioner, levels, message", [
    (Conditioner([ClassTokens(10, dim=12)]), [], "only cross-attention reads: set cross_attention_levels"),
    (Conditioner([ClassEmbedder(10, dim=12)]), [1], "needs a conditioner that makes tokens"),
    (None, [1], "needs a conditioner that makes tokens"),
    (Conditioner([ClassTokens(10, dim=12)]), [2], r"cross_attention_levels \[2\] are not level indices 0..1"),
])
def test_mismatched_tokens_and_levels_are_refused(conditioner, levels, message):
    with pytest.raises(ValueError, match=message):
        _unet(conditioner, cross_attention_levels=levels)


def test_token_embedders_of_different_widths_are_refused():
    with pytest.raises(ValueError, match="share one width"):
        Conditioner([ClassTokens(10, dim=12), ClassTokens(10, dim=8, input_key="other")]).sizes()


def test_guidance_on_condition_dicts_runs_one_doubled_batch_equal_to_two_calls():
    from difflab.diffusion import guidance

    net = _unet(Conditioner([ClassTokens(10, dim=12, p_drop=0.1), ClassEmbedder(10, dim=8, input_key="other")]),
                cross_attention_levels=[0, 1]).eval()
    for layer in (m for m in net.modules() if isinstance(m, CrossAttention)):
        torch.nn.init.normal_(layer.to_out.weight, std=0.2)
    calls = []

    def counted(x, t, cond):
        calls.append(x.shape[0])
        return net(x, t, cond)
    guided = guidance.ClassifierFreeGuidance(counted, None, 3.0, dict_conditions=True)
    x, t = torch.randn(3, 1, 8, 8), torch.randint(0, 1000, (3,))
    cond = {"label": torch.tensor([1, 2, 3]), "other": torch.tensor([4, 5, 6])}
    with torch.no_grad():
        out = guided(x, t, cond)
        unconditional, conditional = net(x, t, None), net(x, t, cond)
    assert calls == [6]  # one call on the doubled batch, not two
    torch.testing.assert_close(out, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-4)
    assert guidance.DROP_KEY == conditioning.DROP_KEY  # the one contract, written on both sides


def test_a_drop_mask_zeroes_exactly_its_rows_and_a_bad_one_is_refused():
    conditioner = Conditioner([ClassTokens(10, dim=12, p_drop=0.0)]).eval()
    like, labels = torch.zeros(3, 1, 8, 8), torch.tensor([1, 2, 3])
    parts = conditioner({"label": labels, conditioning.DROP_KEY: torch.tensor([False, True, False])}, like)
    plain = conditioner({"label": labels}, like)
    torch.testing.assert_close(parts["tokens"][[0, 2]], plain["tokens"][[0, 2]])
    assert not parts["tokens"][1].any() and parts["token_mask"].all()
    with pytest.raises(conditioning.ConditionError, match="'_drop' must be a bool tensor of shape \\[3\\]"):
        conditioner({"label": labels, conditioning.DROP_KEY: torch.tensor([0, 1, 0])}, like)
