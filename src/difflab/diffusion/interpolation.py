"""Interpolation between noise tensors."""

from __future__ import annotations

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation per sample (Shoemake 1985), as used for DDIM latents
    (Song et al. 2021, sec. 5.3): Gaussian noise lives near a sphere, and slerp keeps the
    interpolants' norm there, where a straight line would shrink it towards the mean.
    """
    a_flat, b_flat = a.flatten(1).double(), b.flatten(1).double()
    cos = (a_flat * b_flat).sum(1) / (a_flat.norm(dim=1) * b_flat.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]
    weight = torch.as_tensor(weight, dtype=torch.float64, device=a.device)
    sin = torch.sin(theta)
    # Nearly parallel inputs: slerp tends to the straight line; avoid 0/0.
    safe = sin.abs() > 1e-6
    wa = torch.where(safe, torch.sin((1 - weight) * theta) / torch.where(safe, sin, 1.0), 1 - weight)
    wb = torch.where(safe, torch.sin(weight * theta) / torch.where(safe, sin, 1.0), weight)
    return (wa * a_flat + wb * b_flat).to(a.dtype).view_as(a)
