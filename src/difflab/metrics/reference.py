"""Reference features of real data: computed once over a whole split, cached on disk.

The cache key holds the dataset (name, folder, size, channels, split seed), the split,
the number of images and the extractor's name (which names its weights), so a change in
any of them computes new statistics instead of reusing stale ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from difflab.metrics import cache
from difflab.metrics.features import Features
from difflab.metrics.scores import fid_statistics

log = logging.getLogger("difflab.metrics")
FORMAT = "difflab.reference/1"
MIN_REFERENCE = 1000  # fewer real images than this give noisy FIDs: warn


class Reference:
    """Real-data features (and their FID mean/covariance) for one dataset split and extractor."""

    def __init__(self, features: Features, key: dict[str, Any]) -> None:
        self.features = features
        self.key = key
        self.stats = fid_statistics(features.features)

    @property
    def num(self) -> int:
        return self.features.num


def reference_features(extractor: Callable[[torch.Tensor], Features], datamodule: Any, cache_dir: str | Path,
                       split: str = "train", n: Optional[int] = None, batch_size: int = 500) -> Reference:
    """Features of the first `n` images of a split (all of it when None), from the cache or
    computed in batches and cached (atomic write)."""
    images = datamodule.split(split).images
    n = len(images) if n is None else n
    if not 2 <= n <= len(images):
        raise ValueError(f"reference statistics need 2..{len(images)} images of the {split} split, got n={n}")
    if n < MIN_REFERENCE:
        log.warning("reference statistics from only %d real images: FID/KID will be noisy", n)
    key = {"format": FORMAT, **cache.dataset_key(datamodule), "split": split, "n": n, "extractor": extractor.name}
    path = Path(cache_dir) / "reference" / f"{cache.cache_name('ref-' + split, key)}.pt"
    payload = cache.load(path, key, "reference features")
    features = None if payload is None else Features(payload["features"], payload["logits"])
    if features is None:
        log.info("computing reference features of %d %s images of %s with %s", n, split, datamodule.name,
                 extractor.name)
        features = Features.cat([extractor(images[i:min(i + batch_size, n)]) for i in range(0, n, batch_size)])
        cache.save(path, key, features=features.features, logits=features.logits)
    return Reference(features, key)

