"""One object that scores generated images against a dataset: extractor + cached reference.

Used by the FID callback during training and by `difflab-evaluate`:

    evaluator = SampleEvaluator(datamodule, extractor="domain", cache_dir=".cache")
    fake = evaluator.generate(lambda n, cond, g: module.sample(n, cond=cond, generator=g), n=1000)
    scores = evaluator.score(fake.features, labels=fake.labels)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch

from difflab.metrics.domain import DomainClassifierConfig, domain_extractor
from difflab.metrics.features import ExtractorUnavailableError, Features
from difflab.metrics.reference import reference_features
from difflab.metrics.scores import score_samples

EXTRACTORS = ("domain", "inception")
SampleFn = Callable[[int, Optional[torch.Tensor], torch.Generator], torch.Tensor]


def build_extractor(kind: str, datamodule: Any, cache_dir: str | Path, *, inception_weights: Optional[str] = None,
                    device: str | torch.device = "cpu", domain: Optional[DomainClassifierConfig] = None,
                    min_domain_accuracy: Optional[float] = None) -> Callable[[torch.Tensor], Features]:
    """`domain` (offline classifier trained on the dataset, cached) or `inception`
    (torch-fidelity's Inception-v3, from `inception_weights` or the torch hub cache)."""
    if kind == "domain":
        return domain_extractor(datamodule, cache_dir, domain or DomainClassifierConfig(), device,
                                min_accuracy=min_domain_accuracy)
    if kind == "inception":
        from difflab.metrics.inception import InceptionExtractor

        return InceptionExtractor(inception_weights, device=device)
    raise ExtractorUnavailableError(f"unknown extractor {kind!r}: use one of {', '.join(EXTRACTORS)}")


class Generated(NamedTuple):
    features: Features
    labels: Optional[torch.Tensor]  # the class each image was generated for (conditional models)
    images: torch.Tensor  # a few of the images, for a look


def balanced_labels(n: int, num_classes: int, offset: int = 0) -> torch.Tensor:
    """Labels 0, 1, ..., K-1, 0, 1, ...: the same count per class (up to one)."""
    return (torch.arange(offset, offset + n) % num_classes).long()


class SampleEvaluator:
    """Scores sample sets of one dataset: FID / KID / precision-recall on the extractor's
    features, IS, class accuracy and coverage on its logits, against cached reference
    features of `ref_split` (all of it unless `ref_n`)."""

    def __init__(self, datamodule: Any, extractor: str = "domain", cache_dir: str | Path = ".cache", *,
                 inception_weights: Optional[str] = None, ref_split: str = "train", ref_n: Optional[int] = None,
                 device: str | torch.device = "cpu", domain: Optional[DomainClassifierConfig] = None,
                 min_domain_accuracy: Optional[float] = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 pr_k: int = 3, seed: int = 0) -> None:
        self.kind = extractor
        self.extractor = build_extractor(extractor, datamodule, cache_dir, inception_weights=inception_weights,
                                         device=device, domain=domain, min_domain_accuracy=min_domain_accuracy)
        self.reference = reference_features(self.extractor, datamodule, cache_dir, ref_split, ref_n)
        self.num_classes = datamodule.num_classes if extractor == "domain" else None
        self.options = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size, "pr_k": pr_k, "seed": seed}

    def features(self, images: torch.Tensor) -> Features:
        return self.extractor(images)

    def score(self, fake: Features, labels: Optional[torch.Tensor] = None) -> dict[str, float]:
        """All scores of `fake` against the reference (class accuracy needs `labels` and the
        domain extractor: Inception's classes are ImageNet's)."""
        if self.kind != "domain":
            fake, labels = Features(fake.features), None
        return score_samples(fake, self.reference.features, labels, real_stats=self.reference.stats, **self.options)

    @torch.no_grad()
    def generate(self, sample: SampleFn, n: int, *, batch_size: int = 256, labels: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, keep_images: int = 64,
                 progress: Optional[Callable[[int], None]] = None) -> Generated:
        """Draw `n` images with `sample(batch, cond, generator)` in batches and extract
        features batch by batch (images are not kept beyond `keep_images`)."""
        generator = generator or torch.Generator().manual_seed(0)
        parts, kept = [], []
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            cond = None if labels is None else labels[start:start + size]
            images = sample(size, cond, generator)
            parts.append(self.features(images))
            if sum(len(k) for k in kept) < keep_images:
                kept.append(images[:keep_images].float().cpu())
            if progress is not None:
                progress(size)
        images = torch.cat(kept)[:keep_images] if kept else torch.empty(0)
        return Generated(Features.cat(parts), labels, images)
