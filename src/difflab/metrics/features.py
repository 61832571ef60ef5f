"""What a feature extractor returns, and the error when one cannot be built."""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

import torch


class ExtractorUnavailableError(RuntimeError):
    """A feature extractor cannot be built here (missing weights, no network, no labels);
    the message says what to do instead."""


class Features(NamedTuple):
    """Per-image features (for FID, KID, precision/recall) and class logits (for IS,
    class accuracy and coverage; None when the extractor has no classifier head)."""

    features: torch.Tensor  # [N, D] float32, CPU
    logits: Optional[torch.Tensor] = None  # [N, K] float32, CPU

    @property
    def num(self) -> int:
        """Number of images."""
        return int(self.features.shape[0])

    @staticmethod
    def cat(parts: list["Features"]) -> "Features":
        """Concatenate batches along the sample axis."""
        logits = None if parts[0].logits is None else torch.cat([p.logits for p in parts])
        return Features(torch.cat([p.features for p in parts]), logits)

    def subset(self, index: slice | torch.Tensor) -> "Features":
        return Features(self.features[index], None if self.logits is None else self.logits[index])


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Exact float32 inside, whatever the run set: `float32_matmul_precision=high` lets
    matmuls and convolutions use bf16 / TF32, which would make a cached classifier and its
    features depend on the run that happened to build them. No autocast either."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)
