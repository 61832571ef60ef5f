"""A KL-regularised convolutional autoencoder: the first stage of latent diffusion.

The shape of latent-diffusion's AutoencoderKL (Rombach et al. 2022, sec. 3 and appendix G),
written small: the encoder maps an image to the mean and log-variance of a diagonal
Gaussian over latents of ``latent_channels x (size / f) x (size / f)``, with
``f = 2 ** (len(channel_mults) - 1)``; the decoder maps a latent back to an image. For the
28x28 digits the default ``channel_mults=(1, 2, 2)`` and ``latent_channels=4`` give 4x7x7
latents (f = 4). The network knows nothing of losses or diffusion; see
``difflab.training.autoencoder`` for its training and ``difflab.models.first_stage`` for
its use in front of a diffusion model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from difflab.models.layers import Downsample, GroupNormFP32, ResBlock, SelfAttention, Upsample

AUTOENCODER_FORMAT = "difflab.autoencoder/1"


@dataclass
class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), the encoder's posterior."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return (0.5 * self.logvar).exp()

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """z = mean + std * eps (the reparameterisation of Kingma & Welling 2014)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> Tensor:
        """KL(q(z | x) || N(0, I)) per sample, summed over the latent elements: shape [B]."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def _check(channel_mults: Sequence[int], image_size: int, latent_channels: int, num_groups: int,
           base_channels: int) -> int:
    if not channel_mults or any(m < 1 for m in channel_mults):
        raise ValueError(f"channel_mults={list(channel_mults)} must be a non-empty list of integers >= 1")
    if latent_channels < 1:
        raise ValueError(f"latent_channels={latent_channels} must be >= 1")
    factor = 2 ** (len(channel_mults) - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by the downsampling factor {factor} of "
                         f"channel_mults={list(channel_mults)}; use fewer levels or another image size")
    for mult in channel_mults:
        if (base_channels * mult) % num_groups:
            raise ValueError(f"width {base_channels * mult} is not divisible by num_groups={num_groups}")
    return factor


class Encoder(nn.Module):
    """conv_in -> per level: ResBlocks, then a stride-2 conv (not after the last) -> mid
    ResBlock (+ attention) ResBlock -> GroupNorm, SiLU, conv to 2 * latent channels."""

    def __init__(self, in_channels: int, latent_channels: int, base_channels: int, channel_mults: Sequence[int],
                 num_res_blocks: int, num_groups: int, mid_attention: bool) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        current = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(current, width, None, 0.0, num_groups))
                current = width
            if level < len(widths) - 1:
                layers.append(Downsample(current))
        self.down = nn.Sequential(*layers)
        self.mid = nn.Sequential(ResBlock(current, current, None, 0.0, num_groups),
                                 SelfAttention(current, current, num_groups) if mid_attention else nn.Identity(),
                                 ResBlock(current, current, None, 0.0, num_groups))
        self.out = nn.Sequential(GroupNormFP32(num_groups, current), nn.SiLU(),
                                 nn.Conv2d(current, 2 * latent_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.mid(self.down(self.conv_in(x))))


class Decoder(nn.Module):
    """The encoder mirrored: conv_in -> mid -> per level (deepest first): ResBlocks, then a
    nearest 2x upsample + conv (not after the last) -> GroupNorm, SiLU, conv to the image."""

    def __init__(self, out_channels: int, latent_channels: int, base_channels: int, channel_mults: Sequence[int],
                 num_res_blocks: int, num_groups: int, mid_attention: bool) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mults][::-1]
        current = widths[0]
        self.conv_in = nn.Conv2d(latent_channels, current, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(current, current, None, 0.0, num_groups),
                                 SelfAttention(current, current, num_groups) if mid_attention else nn.Identity(),
                                 ResBlock(current, current, None, 0.0, num_groups))
        layers: list[nn.Module] = []
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(current, width, None, 0.0, num_groups))
                current = width
            if level < len(widths) - 1:
                layers.append(Upsample(current))
        self.up = nn.Sequential(*layers)
        self.norm_out = GroupNormFP32(num_groups, current)
        self.conv_out = nn.Conv2d(current, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The weight of the final convolution (VQGAN's adaptive GAN weight reads its gradients)."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Image <-> latent with a diagonal-Gaussian posterior.

    Args:
        in_channels: image channels (null in a config: taken from the data).
        image_size: image side (null in a config: taken from the data).
        latent_channels: channels of the latent.
        base_channels: width of the full-resolution level.
        channel_mults: width multiplier per level; each level after the first halves H and W.
        num_res_blocks: residual blocks per level (the decoder has one more, as in LDM).
        num_groups: GroupNorm groups.
        mid_attention: self-attention at the lowest resolution.
    """

    def __init__(self, in_channels: Optional[int] = None, image_size: Optional[int] = None, latent_channels: int = 4,
                 base_channels: int = 32, channel_mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 num_groups: int = 8, mid_attention: bool = False) -> None:
        super().__init__()
        if in_channels is None or image_size is None:
            raise ValueError("AutoencoderKL needs in_channels and image_size (difflab-train takes them from the data)")
        self.factor = _check(channel_mults, image_size, latent_channels, num_groups, base_channels)
        self.in_channels, self.image_size, self.latent_channels = in_channels, image_size, latent_channels
        self._config = {"in_channels": in_channels, "image_size": image_size, "latent_channels": latent_channels,
                        "base_channels": base_channels, "channel_mults": list(channel_mults),
                        "num_res_blocks": num_res_blocks, "num_groups": num_groups, "mid_attention": mid_attention}
        shared = (latent_channels, base_channels, channel_mults, num_res_blocks, num_groups, mid_attention)
        self.encoder = Encoder(in_channels, *shared)
        self.decoder = Decoder(in_channels, *shared)

    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``AutoencoderKL(**ae.config())`` rebuilds it."""
        return dict(self._config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.factor
        return (self.latent_channels, side, side)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)
        # LDM clamps the log-variance so an early step cannot overflow exp().
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True, generator: Optional[torch.Generator] = None
                ) -> tuple[Tensor, DiagonalGaussian]:
        """(reconstruction, posterior): decodes a posterior sample (or its mean)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mean
        return self.decode(z), posterior


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017): strided convs that score overlapping
    patches as real or fake, one logit per patch."""

    def __init__(self, in_channels: int = 1, width: int = 32, num_layers: int = 2, num_groups: int = 8) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"PatchDiscriminator num_layers={num_layers} must be >= 1")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        current = width
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(current, current * 2, 4, stride=2, padding=1),
                       GroupNormFP32(num_groups, current * 2), nn.LeakyReLU(0.2)]
            current *= 2
        layers.append(nn.Conv2d(current, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
