"""Building blocks of the U-Net: time embedding, residual block, self-attention, resampling.

Every block keeps whatever memory format it is given (channels_last stays channels_last)
and never reads a tensor value on the host, so the whole network can run in bf16
autocast and be traced by ``torch.compile(fullgraph=True)`` without breaks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal position code of (possibly fractional) timesteps ``t`` [B] -> [B, dim].

    The Transformer code (Vaswani et al. 2017, sec. 3.5) as used for timesteps by DDPM
    (Ho et al. 2020, appendix B): half the channels are cos, half sin, with geometrically
    spaced frequencies from 1 down to 1/max_period.
    """
    half = dim // 2
    # Built on the fly from t's device, so the network holds no buffer for EMA to touch.
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / half
    frequencies = torch.exp(-math.log(max_period) * exponent)
    angles = t.float()[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:  # odd width: pad one zero channel so the MLP sees exactly `dim` inputs
        embedding = F.pad(embedding, (0, 1))
    return embedding


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias so its block starts as the identity (residual) or
    the network starts by predicting zero; keeps early training stable."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class GroupNormFP32(nn.GroupNorm):
    """GroupNorm that normalises in float32 and returns the input's dtype.

    Why: under bf16 autocast on CPU, PyTorch's channels_last GroupNorm kernel is slow for
    bf16 inputs; upcasting around its float32 kernel cut a bf16 channels_last training step
    of the peer-config U-Net from ~1050 to ~880 ms of one core (round-robin minimum of
    several steps), with no NCHW copies. Float32 statistics are also the safer numerics.
    """

    def forward(self, x: Tensor) -> Tensor:
        normalised = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
        return normalised.to(x.dtype)


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on an embedding by FiLM scale-shift.

    GroupNorm -> SiLU -> conv3x3, then GroupNorm -> h * (1 + scale) + shift -> SiLU ->
    dropout -> conv3x3 (zero-initialised), plus a 1x1 skip when the width changes.
    (scale, shift) come from one linear projection of the already-SiLU'd embedding,
    as in Improved DDPM (Nichol & Dhariwal 2021, sec. 3) / ADM's "use_scale_shift_norm".
    With ``embed_dim=None`` the block has no embedding (an autoencoder's block): the
    second GroupNorm is applied without scale and shift.
    """

    def __init__(
        self, in_channels: int, out_channels: int, embed_dim: int | None, dropout: float, num_groups: int
    ) -> None:
        super().__init__()
        self.norm_in = GroupNormFP32(num_groups, in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed_proj = nn.Linear(embed_dim, 2 * out_channels) if embed_dim else None
        self.norm_out = GroupNormFP32(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, embed_act: Tensor | None = None) -> Tensor:
        """``x`` [B, C_in, H, W]; ``embed_act`` = SiLU(embedding) [B, embed_dim] (None without one)."""
        h = self.conv_in(F.silu(self.norm_in(x)))
        if self.embed_proj is None:
            h = self.norm_out(h)
        else:
            # [B, 2C] -> two [B, C, 1, 1]: a size-1 spatial broadcast keeps h's memory format.
            scale, shift = self.embed_proj(embed_act)[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm_out(h), 1 + scale)
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    Runs on channels-last tokens: for a channels_last input, ``permute(0, 2, 3, 1)`` is
    already a contiguous [B, H, W, C] view, q/k/v are strided views of one projection, and
    the CPU flash kernel returns its output laid out [B, L, heads, d], so merging the heads
    is a view too; the result is handed back as a channels_last view. No layout copies.
    """

    def __init__(self, channels: int, head_dim: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        if channels % self.num_heads:
            raise ValueError(
                f"attention over {channels} channels cannot be split into heads of "
                f"{head_dim} channels; choose attention_head_dim dividing {channels}"
            )
        self.norm = GroupNormFP32(num_groups, channels)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        # [B, L, 3C] -> three [B, heads, L, d] strided views; SDPA reads strided inputs.
        q, k, v = (
            self.to_qkv(tokens)
            .unflatten(-1, (3, self.num_heads, -1))
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        if q.device.type == "cpu" and torch.is_grad_enabled():
            # PyTorch's CPU flash-attention backward is 2-4x slower in bf16 than in float32
            # at these sizes (L = 49..196, head_dim 32), so when training on CPU attend in
            # float32 even under autocast (peer-config bf16 training step: ~880 -> ~770 ms
            # of one core); the projections around it stay bf16. Without autograd
            # (sampling) the bf16 forward is the faster one and is kept.
            with torch.autocast("cpu", enabled=False):
                attended = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        else:
            attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)
        out = self.to_out(attended).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return x + out


class CrossAttention(nn.Module):
    """Multi-head attention from the H*W positions (queries) to a sequence of condition
    tokens (keys and values), with a residual connection: the text conditioning of latent
    diffusion (Rombach et al. 2022, sec. 3.3), with SDPA.

    ``context`` is [B, L, context_dim]; ``mask`` [B, L] is True on real tokens and False on
    padding (a key-padding mask: variable-length sequences in one batch). A row with no real
    token attends to all of its positions rather than producing NaN. Like ``SelfAttention``,
    it attends in float32 when training on CPU, and keeps the input's memory format.
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        if channels % self.num_heads:
            raise ValueError(f"cross-attention over {channels} channels cannot be split into heads of {head_dim} "
                             f"channels; choose attention_head_dim dividing {channels}")
        self.norm = GroupNormFP32(num_groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_dim, 2 * channels)
        self.to_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, channels, height, width = x.shape
        if context.ndim != 3 or context.shape[0] != batch:
            raise ValueError(f"context must be tokens [{batch}, L, D], got {tuple(context.shape)}")
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        q = self.to_q(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [B, heads, HW, d]
        k, v = self.to_kv(context.to(tokens.dtype)).unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None:
            mask = mask.to(torch.bool)
            mask = mask | ~mask.any(dim=1, keepdim=True)  # nothing to attend to: attend to everything
            attn_mask = mask[:, None, None, :]  # [B, 1, 1, L], broadcast over heads and queries
        if q.device.type == "cpu" and torch.is_grad_enabled():  # see SelfAttention
            with torch.autocast("cpu", enabled=False):
                attended = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)
        out = self.to_out(attended.to(tokens.dtype)).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return x + out


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (learned, unlike pooling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition then a 3x3 convolution
    (avoids the checkerboard artefacts of transposed convolutions)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
