"""The first stage: the space a diffusion model works in (Rombach et al. 2022, sec. 3-4).

``LatentSpace`` puts a frozen autoencoder in front of the diffusion model: training images
become latents ``z = s * sample(q(z | x))`` and samples are decoded by ``x = D(z / s)``.
The scale factor ``s`` makes the latents unit-variance (LDM sec. 4.3.2: "we rescale the latents
by the component-wise standard deviation"), so the noise schedule means the same as in
pixel space: ``fit_scale`` sets it to 1/std over all training latents (not one batch). It is
a persistent buffer, so it travels in every checkpoint. Pixel space is no first stage at
all (None): samplers, guidance and metrics never know which space they are in.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from difflab.models.autoencoder import AutoencoderKL


class LatentSpace(nn.Module):
    """A frozen autoencoder as the first stage; see the module docstring.

    Args:
        autoencoder: a trained AutoencoderKL (frozen here: no gradients, always eval mode).
        scale_factor: s; 1.0 until ``fit_scale``.
        sample_posterior: training latents are posterior samples (LDM) rather than the means.
    """

    def __init__(self, autoencoder: AutoencoderKL, scale_factor: float = 1.0, sample_posterior: bool = True) -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.sample_posterior = sample_posterior

    def train(self, mode: bool = True) -> "LatentSpace":
        super().train(mode)
        self.autoencoder.eval()  # frozen: the first stage never trains
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        ae = self.autoencoder
        return (ae.in_channels, ae.image_size, ae.image_size)

    @torch.no_grad()
    def moments(self, images: Tensor) -> Tensor:
        """Scaled posterior mean and std, concatenated on channels: [B, 2C, h, w] (what a
        latent cache holds; ``sample`` draws training latents from it)."""
        posterior = self.autoencoder.encode(images)
        return torch.cat([posterior.mean, posterior.std], dim=1) * self.scale_factor

    def sample(self, moments: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Training latents from cached ``moments``: a posterior sample, or its mean."""
        mean, std = moments.float().chunk(2, dim=1)
        if not self.sample_posterior:
            return mean
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    @torch.no_grad()
    def moments_of(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """``moments`` of a whole split, encoded in batches on this module's device (CPU result)."""
        device = self.scale_factor.device
        parts = [self.moments(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(parts) if parts else images.new_zeros((0, 2 * self.latent_shape[0], *self.latent_shape[1:]))

    @torch.no_grad()
    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.sample(self.moments(images), generator)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (clamped) from scaled latents."""
        return self.autoencoder.decode(latents.float() / self.scale_factor).float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def fit_scale(self, images: Tensor, batch_size: int = 500, seed: int = 0) -> float:
        """Set s = 1 / std over the latents of all `images` (posterior samples, seeded)."""
        self.scale_factor.fill_(1.0)
        latents = self.sample(self.moments_of(images, batch_size), torch.Generator().manual_seed(seed))
        std = latents.double().std().item()
        if not std > 0:
            raise ValueError("the autoencoder maps every training image to the same latent: it is not trained")
        self.scale_factor.fill_(1.0 / std)
        return 1.0 / std
