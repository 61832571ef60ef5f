"""Networks that map (x, t, cond) to a prediction; they know nothing of diffusion."""

from difflab.models.unet import UNet, to_channels_last

__all__ = ["UNet", "to_channels_last"]
