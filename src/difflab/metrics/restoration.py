"""Scores and baselines for restoration (inpainting, super-resolution) on held-out images.

Scores of restorations of the held-out images against their truth:
- ``label_agreement``: the domain classifier gives the restoration the true label;
- ``psnr`` (peak-to-peak 2 for images in [-1, 1]) and ``ssim`` (torchmetrics, on [0, 1]), ``psnr_hole``
  on the hole pixels only (inpainting);
- ``consistency_psnr``: A(restored) against the measurement y (inf when exact);
- ``fid`` of the restorations against the training images (domain features);
- ``diversity``: pixel std over several restorations of one input, averaged.

``label_ceiling``: what the known pixels alone tell about the label, from a classifier of the
domain classifier's architecture trained on degraded training images: its accuracy (the best
single guess) and the mean probability it gives the true label (what a sampler of the
posterior, whose restorations carry label c with probability p(c | y), agrees on).

Baselines, the honest alternatives that use no diffusion model: ``zero`` fill, the mean
training image in the hole (``mean``), the ``nearest`` training image on the known pixels
(inpainting); ``nearest`` and ``bicubic`` upsampling (super-resolution).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from difflab.diffusion.degradation import Downsample, Inpaint, Operator
from difflab.metrics.domain import DomainClassifierConfig, train_domain_classifier

INPAINT_BASELINES = ("zero", "mean", "nearest")
SUPERRES_BASELINES = ("nearest", "bicubic")


def psnr(restored: torch.Tensor, truth: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """PSNR in dB over all images (pixels where ``where`` is True), peak-to-peak 2."""
    diff = (restored.double() - truth.double()).pow(2)
    if where is not None:
        diff = diff[where.expand_as(diff)]
    mse = diff.mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


def ssim(restored: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian window 11 / sigma 1.5, or smaller for tiny images)."""
    kernel = min(11, (min(truth.shape[-2:]) // 2) * 2 - 1)
    # On [0, 1]: torchmetrics clamps its inputs to [0, data_range], which would cut [-1, 0) off.
    unit = [((images.float() + 1) / 2).clamp(0, 1) for images in (restored, truth)]
    return float(structural_similarity_index_measure(*unit, data_range=1.0, kernel_size=kernel,
                                                     sigma=1.5 * kernel / 11))


def diversity(restorations: torch.Tensor) -> float:
    """Mean over inputs and pixels of the std over restorations ``[inputs, k, C, H, W]`` (k >= 2)."""
    return float(restorations.double().std(dim=1).mean())


def baseline(name: str, operator: Operator, y: torch.Tensor, train: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The restorations of measurements ``y`` by a method that learns nothing: see the module."""
    if isinstance(operator, Inpaint):
        keep = operator.keep.to(y.device)
        if name == "zero":
            return operator.A_pinv(y)
        if name == "mean":
            return torch.where(keep, y, train.mean(0, keepdim=True))
        if name == "nearest":
            weights = keep.expand(1, *train.shape[1:]).flatten(1).to(train.dtype)
            picks = []
            for start in range(0, len(y), chunk):
                known = (y[start:start + chunk].flatten(1) * weights)
                # Squared distance on the known pixels to every training image.
                dist = (known.pow(2).sum(1, keepdim=True) - 2 * known @ (train.flatten(1) * weights).T
                        + (train.flatten(1).pow(2) * weights).sum(1))
                picks.append(dist.argmin(1))
            return torch.where(keep, y, train[torch.cat(picks)])
        allowed = INPAINT_BASELINES
    elif isinstance(operator, Downsample):
        size = tuple(s * operator.factor for s in y.shape[-2:])
        if name == "nearest":
            return operator.A_pinv(y)
        if name == "bicubic":
            return F.interpolate(y, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        allowed = SUPERRES_BASELINES
    else:
        raise ValueError(f"no baselines for {operator!r}")
    raise ValueError(f"unknown baseline {name!r} for {operator!r}; allowed: {', '.join(allowed)}")


def restoration_scores(restored: torch.Tensor, truth: torch.Tensor, operator: Operator,
                       y: torch.Tensor) -> dict[str, float]:
    """The pixel scores of one method: PSNR, SSIM, hole PSNR (masks) and consistency."""
    scores = {"psnr": psnr(restored, truth), "ssim": ssim(restored, truth)}
    if isinstance(operator, Inpaint):
        scores["psnr_hole"] = psnr(restored, truth, operator.hole)
    scores["consistency_psnr"] = psnr(operator.A(restored), y)
    return scores


def calibrated_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The softmax temperature of least negative log-likelihood of ``labels`` (a grid search,
    log-spaced over [0.25, 8]): one number that undoes a classifier's over- or under-confidence."""
    grid = torch.logspace(math.log10(0.25), math.log10(8.0), 121, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(logits.double() / t, labels) for t in grid])
    return float(grid[nll.argmin()])


def label_ceiling(operator: Operator, train_images: torch.Tensor, train_labels: torch.Tensor,
                  images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  steps: int = DomainClassifierConfig.steps) -> dict[str, float]:
    """What the measurement alone says about the label of ``images`` (see the module docstring).

    The classifier sees ``A^+ A x`` (the hole at 0, or the low-res image upsampled), trained
    with the domain classifier's recipe but without random shifts, which would move the hole.
    Its probabilities q are calibrated by one temperature fitted on ``images`` themselves;
    ``posterior``, the mean of q(true label | y), estimates E_y sum_c p(c | y) q(c | y): where q is
    the posterior, the label agreement of an exact posterior sampler judged by a perfect classifier. ``best_guess`` is the accuracy of the
    classifier's argmax, the agreement of a restoration that always picks the likeliest reading.
    """
    seen_train, seen = (operator.A_pinv(operator.A(x)) for x in (train_images, images))
    config = DomainClassifierConfig(max_shift=0, steps=steps)
    model, accuracy = train_domain_classifier(seen_train, train_labels, seen, labels, num_classes, config)
    with torch.no_grad():
        logits = model(seen).double()
    temperature = calibrated_temperature(logits, labels)
    probs = (logits / temperature).softmax(1)
    return {"best_guess": accuracy, "posterior": float(probs.gather(1, labels[:, None]).mean()),
            "temperature": temperature}
