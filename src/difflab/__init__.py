"""difflab: a research experiment framework for diffusion models."""

__version__ = "0.1.0"
