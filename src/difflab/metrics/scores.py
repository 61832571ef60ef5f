"""Sample-quality scores from features, computed by torch-fidelity's feature-level functions.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the two feature
  sets, ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), in float64.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged
  over random subsets; unbiased, so two samples of one distribution give ~0 (even < 0).
- IS (Salimans et al. 2016): exp E[KL(p(y|x) || p(y))] from classifier logits.
- Precision / recall (Kynkaanniemi et al. 2019): the share of generated samples inside
  the k-NN balls of the real ones, and the other way round.

The features come from an extractor (`difflab.metrics.extractors`); reference features
of real data come from `difflab.metrics.reference`, cached on disk.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from torch_fidelity import metric_fid, metric_isc, metric_kid, metric_prc

from difflab.metrics.features import Features


def _float64(features: torch.Tensor) -> torch.Tensor:
    return features.detach().to("cpu", torch.float64)


def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean and covariance (float64) of [N, D] features, as torch-fidelity stores them."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need [N >= 2, D] features, got {tuple(features.shape)}")
    return metric_fid.fid_features_to_statistics(_float64(features))


def fid_from_statistics(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    return float(metric_fid.fid_statistics_to_metric(stats_1, stats_2, verbose=False)[metric_fid.KEY_METRIC_FID])


def fid(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """Frechet distance between two feature sets."""
    return fid_from_statistics(fid_statistics(features_1), fid_statistics(features_2))


def kid(fake: torch.Tensor, real: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel distance (mean, std over `subsets` random subsets of `subset_size`, capped at
    the smaller set's size)."""
    size = min(subset_size, fake.shape[0], real.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    out = metric_kid.kid_features_to_metric(_float64(fake), _float64(real), kid_subsets=subsets,
                                            kid_subset_size=size, rng_seed=seed, verbose=False)
    return out[metric_kid.KEY_METRIC_KID_MEAN], out[metric_kid.KEY_METRIC_KID_STD]


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS (mean, std over `splits` splits) from classifier logits; at most the class count."""
    splits = max(1, min(splits, logits.shape[0] // 2))
    out = metric_isc.isc_features_to_metric(logits.detach().cpu().double(), splits=splits, shuffle=True,
                                            rng_seed=seed)
    return out[metric_isc.KEY_METRIC_ISC_MEAN], out[metric_isc.KEY_METRIC_ISC_STD]


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifolds (k=3 as in the paper)."""
    if min(fake.shape[0], real.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    out = metric_prc.prc_features_to_metric(fake.detach().cpu().float(), real.detach().cpu().float(),
                                            prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=True,
                                            verbose=False)
    return out[metric_prc.KEY_METRIC_PRECISION], out[metric_prc.KEY_METRIC_RECALL]


def class_histogram(logits: torch.Tensor) -> torch.Tensor:
    """How many samples the classifier assigns to each class."""
    return torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1])


def class_coverage(logits: torch.Tensor, min_share: float = 0.5) -> float:
    """Share of classes that receive at least `min_share` of their fair share (n / K) of
    the samples: 1.0 for a balanced sample, lower under mode collapse or mode dropping."""
    counts = class_histogram(logits).double()
    fair = logits.shape[0] / logits.shape[1]
    return float((counts >= min_share * fair).double().mean())


def class_entropy(logits: torch.Tensor) -> float:
    """Entropy of the predicted-class histogram over log K: 1.0 when uniform, 0 for one class."""
    p = class_histogram(logits).double()
    p = p / p.sum()
    nonzero = p[p > 0]
    return float(-(nonzero * nonzero.log()).sum() / math.log(logits.shape[1]))


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples the classifier puts in the class they were generated for."""
    return float((logits.argmax(dim=1).cpu() == labels.cpu()).double().mean())


def score_samples(fake: Features, real: Features, labels: Optional[torch.Tensor] = None, *,
                  kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3,
                  is_splits: int = 10, seed: int = 0, real_stats: Optional[dict[str, Any]] = None
                  ) -> dict[str, float]:
    """Every score for one sample set against the reference features.

    `labels` are the classes the samples were generated for (conditional models): with
    them, `class_accuracy`. With classifier logits, `is`, `class_coverage` and
    `class_entropy`. `real_stats` (mean/cov of `real.features`) skips recomputing them.
    """
    stats = real_stats if real_stats is not None else fid_statistics(real.features)
    scores: dict[str, float] = {"fid": fid_from_statistics(fid_statistics(fake.features), stats)}
    scores["kid"], scores["kid_std"] = kid(fake.features, real.features, kid_subsets, kid_subset_size, seed)
    scores["precision"], scores["recall"] = precision_recall(fake.features, real.features, pr_k)
    if fake.logits is not None:
        scores["is"], scores["is_std"] = inception_score(fake.logits, is_splits, seed)
        scores["class_coverage"] = class_coverage(fake.logits)
        scores["class_entropy"] = class_entropy(fake.logits)
        if labels is not None:
            scores["class_accuracy"] = class_accuracy(fake.logits, labels)
    return scores
