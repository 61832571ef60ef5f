"""Lightning layer: the LightningModule, EMA, callbacks (checkpoints, grids, FID), checkpoints."""

from .ema import EMA
from .module import DiffusionModule

__all__ = ["EMA", "DiffusionModule"]
