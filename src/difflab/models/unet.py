"""The DDPM-style U-Net: a network of (x, t, cond) that knows nothing of diffusion.

Shape of the network (Ho et al. 2020, appendix B; Dhariwal & Nichol 2021):
  conv_in -> for each level: num_res_blocks x [ResBlock (+ attention)] then a stride-2
  downsample (not after the last level); every intermediate result is kept as a skip ->
  mid: ResBlock, attention, ResBlock -> for each level, deepest first:
  (num_res_blocks + 1) x [concat one skip, ResBlock (+ attention)] then a 2x upsample
  (not after level 0) -> GroupNorm, SiLU, conv_out (zero-initialised).

Level i works at H / 2**i, with base_channels * channel_mults[i] channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from difflab.models.conditioning import Conditioner, vector_projection
from difflab.models.layers import (
    CrossAttention,
    Downsample,
    GroupNormFP32,
    ResBlock,
    SelfAttention,
    Upsample,
    sinusoidal_embedding,
    zero_init,
)


class ResAttentionBlock(nn.Module):
    """One residual block, optionally followed by self-attention and by cross-attention to
    condition tokens (``context_dim`` > 0) at the same width."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embed_dim: int,
        dropout: float,
        num_groups: int,
        attention: bool,
        head_dim: int,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, embed_dim, dropout, num_groups)
        self.attention = (
            SelfAttention(out_channels, head_dim, num_groups) if attention else nn.Identity()
        )
        self.cross = CrossAttention(out_channels, context_dim, head_dim, num_groups) if context_dim else None

    def forward(self, x: Tensor, embed_act: Tensor, context: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        h = self.attention(self.res(x, embed_act))
        return h if self.cross is None else self.cross(h, context, mask)


class UNet(nn.Module):
    """U-Net denoiser backbone: ``forward(x, t, cond=None) -> [B, out_channels, H, W]``.

    Args:
        in_channels: image channels (1 for grey digits, 3 for RGB).
        out_channels: predicted channels; defaults to ``in_channels``.
        base_channels: width of level 0; level i has ``base_channels * channel_mults[i]``.
        channel_mults: one multiplier per level; there are ``len(channel_mults)`` levels.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: indices of the levels that get self-attention after each block.
        mid_attention: self-attention between the two residual blocks of the middle.
        attention_head_dim: channels per attention head.
        dropout: dropout rate inside residual blocks.
        num_groups: GroupNorm groups; must divide every channel count.
        num_classes: number of class labels for conditioning, or None for unconditional.
            The embedding has ``num_classes + 1`` rows: row ``num_classes`` is the null
            class, used when ``cond`` is None (classifier-free guidance drops to it).
        image_size: if given, checked at construction to be divisible by the downsampling.
        time_embed_mult: the time/class embedding has ``base_channels * time_embed_mult`` dims.
        gradient_checkpointing: in training, keep only each block's input and recompute the
            block in the backward pass: less activation memory for one more forward of compute.
        conditioner: a ``models.conditioning.Conditioner``; ``cond`` is then a dict of its
            inputs, its ``concat`` part widens the first convolution, its ``vector`` part is
            added to the time embedding and its ``tokens`` are attended to by cross-attention.
            ``cond=None`` drops every condition (zeros).
        cross_attention_levels: levels whose blocks attend to the conditioner's tokens (the
            middle attends too when the deepest level is among them); needed, and only
            allowed, with a conditioner that makes tokens.
        patch_size: ``p > 1`` folds each p x p patch into channels before the first
            convolution (pixel unshuffle: lossless) and unfolds the prediction after the last
            one (pixel shuffle), so level 0 runs at 1/p of the image size: about p**2 less
            compute at the full-size level, as in simple diffusion (Hoogeboom et al. 2023).

    ``t`` may be integer or fractional timesteps [B], or a scalar used for the whole batch.
    For speed on CPU, call ``to_channels_last(model)`` and run under bf16 autocast.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (1,),
        mid_attention: bool = True,
        attention_head_dim: int = 32,
        dropout: float = 0.0,
        num_groups: int = 8,
        num_classes: int | None = None,
        image_size: int | None = None,
        time_embed_mult: int = 4,
        gradient_checkpointing: bool = False,
        conditioner: Conditioner | None = None,
        cross_attention_levels: Sequence[int] = (),
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        channel_mults = tuple(channel_mults)
        attention_levels = tuple(attention_levels)
        cross_levels = tuple(cross_attention_levels)
        _check_config(base_channels, channel_mults, attention_levels, num_groups, num_res_blocks)
        if patch_size < 1:
            raise ValueError(f"patch_size must be an integer >= 1, got {patch_size}")
        self.patch_size = patch_size
        outside = [lvl for lvl in cross_levels if not 0 <= lvl < len(channel_mults)]
        if outside:
            raise ValueError(f"cross_attention_levels {outside} are not level indices 0..{len(channel_mults) - 1}")
        self.in_channels = in_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.out_channels = in_channels if out_channels is None else out_channels
        self.num_classes = num_classes
        self.image_size = image_size  # None: any size divisible by size_divisor (samplers need a shape)
        self.size_divisor = patch_size * 2 ** (len(channel_mults) - 1)
        if image_size is not None:
            _check_size(image_size, image_size, self.size_divisor)

        self.time_embed_in_dim = base_channels
        embed_dim = base_channels * time_embed_mult
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        self.class_embed = (
            nn.Embedding(num_classes + 1, embed_dim) if num_classes is not None else None
        )
        self.conditioner = conditioner
        sizes = conditioner.sizes() if conditioner is not None else {"concat": 0, "vector": 0, "tokens": 0}
        context_dim = sizes["tokens"]
        if context_dim and not cross_levels:
            raise ValueError("the conditioner makes tokens, which only cross-attention reads: set "
                             "cross_attention_levels (e.g. [1, 2])")
        if cross_levels and not context_dim:
            raise ValueError(f"cross_attention_levels={list(cross_levels)} needs a conditioner that makes tokens "
                             "(a text encoder or ClassTokens)")
        self.concat_channels = sizes["concat"]
        self.vector_embed = vector_projection(sizes["vector"], embed_dim) if sizes["vector"] else None

        def block(cin: int, cout: int, attention: bool, cross: bool = False) -> ResAttentionBlock:
            return ResAttentionBlock(
                cin, cout, embed_dim, dropout, num_groups, attention, attention_head_dim,
                context_dim if cross else 0,
            )

        widths = [base_channels * m for m in channel_mults]
        folded = patch_size * patch_size  # channels per input channel after the pixel unshuffle
        self.conv_in = nn.Conv2d((in_channels + self.concat_channels) * folded, base_channels, 3, padding=1)
        skip_widths = [base_channels]
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        current = base_channels
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(block(current, width, level in attention_levels, level in cross_levels))
                current = width
                skip_widths.append(current)
            self.down_blocks.append(blocks)
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(current))
                skip_widths.append(current)

        mid_cross = len(widths) - 1 in cross_levels
        self.mid = nn.ModuleList(
            [block(current, current, mid_attention, mid_cross), block(current, current, False)]
        )

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                skip_width = skip_widths.pop()
                blocks.append(block(current + skip_width, widths[level], level in attention_levels,
                                    level in cross_levels))
                current = widths[level]
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamples.append(Upsample(current))

        self.norm_out = GroupNormFP32(num_groups, current)
        self.conv_out = zero_init(nn.Conv2d(current, self.out_channels * folded, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | dict | None = None) -> Tensor:
        """Predict from noisy images ``x`` [B, C, H, W] at timesteps ``t`` with labels ``cond``
        (or, with a conditioner, the dict of its inputs)."""
        self._check_input(x)
        parts: dict[str, Tensor] = {}
        if self.conditioner is not None:
            if cond is not None and not isinstance(cond, dict):
                raise ValueError(f"this U-Net is conditioned on {self.conditioner.input_keys}: pass cond as a dict "
                                 "of them (or None for the unconditional prediction)")
            parts = self.conditioner(cond or {}, x, drop_all=cond is None)
            cond = None
        embed = self._embed(x, t, cond)
        if self.vector_embed is not None:
            embed = embed + self.vector_embed(parts["vector"].to(embed.dtype))
        embed_act = F.silu(embed)  # every block starts with SiLU: do it once
        context, mask = parts.get("tokens"), parts.get("token_mask")

        def run(block: nn.Module, h: Tensor) -> Tensor:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant checkpointing: keeps autocast and RNG state, and traces under compile.
                return checkpoint(block, h, embed_act, context, mask, use_reentrant=False)
            return block(h, embed_act, context, mask)

        h = torch.cat([x, parts["concat"].to(x.dtype)], dim=1) if self.concat_channels else x
        if self.patch_size > 1:
            h = F.pixel_unshuffle(h, self.patch_size)
        h = self.conv_in(h)
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for blk in blocks:
                h = run(blk, h)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)

        for blk in self.mid:
            h = run(blk, h)

        for i, blocks in enumerate(self.up_blocks):
            for blk in blocks:
                h = run(blk, torch.cat([h, skips.pop()], dim=1))
            if i < len(self.upsamples):
                h = self.upsamples[i](h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out

    def _embed(self, x: Tensor, t: Tensor | float, cond: Tensor | None) -> Tensor:
        batch = x.shape[0]
        if not isinstance(t, Tensor):  # a Python number: fill on the device, no host copy
            t = torch.full((batch,), t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
        embed = self.time_mlp(sinusoidal_embedding(t, self.time_embed_in_dim))
        if self.class_embed is None:
            if cond is not None:
                raise ValueError(
                    "cond was given but this UNet is unconditional; build it with num_classes=N"
                )
            return embed
        if cond is None:
            cond = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
        elif cond.shape != (batch,):
            raise ValueError(
                f"cond must be class labels of shape [{batch}], got {tuple(cond.shape)}"
            )
        return embed + self.class_embed(cond)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        _check_size(x.shape[-2], x.shape[-1], self.size_divisor)


def _check_size(height: int, width: int, divisor: int) -> None:
    if height % divisor or width % divisor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by {divisor} = patch_size * 2**(levels - 1), "
            f"which the U-Net's patches and downsampling need; use an image_size that is a multiple of "
            f"{divisor}, or fewer channel_mults (levels) or a smaller patch_size"
        )


def _check_config(
    base_channels: int,
    channel_mults: tuple[int, ...],
    attention_levels: tuple[int, ...],
    num_groups: int,
    num_res_blocks: int,
) -> None:
    if not channel_mults or num_res_blocks < 1:
        raise ValueError("need at least one level (channel_mults) and num_res_blocks >= 1")
    widths = {base_channels} | {base_channels * m for m in channel_mults}
    bad = sorted(w for w in widths if w % num_groups)
    if bad:
        raise ValueError(
            f"num_groups={num_groups} must divide every channel count, but not {bad}; "
            f"pick num_groups dividing base_channels * each of channel_mults"
        )
    outside = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mults)]
    if outside:
        raise ValueError(
            f"attention_levels {outside} are not level indices 0..{len(channel_mults) - 1}"
        )


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store the model's 4-D weights channels_last (in place) and return it.

    With channels_last conv weights every activation comes out channels_last, which is the
    layout oneDNN's fast (AMX/bf16) kernels want; pass inputs as
    ``x.contiguous(memory_format=torch.channels_last)`` to skip one conversion.
    """
    return model.to(memory_format=torch.channels_last)
