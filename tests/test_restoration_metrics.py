"""Restoration scores and baselines (metrics.restoration) on small known cases."""

import math

import pytest
import torch

from difflab.diffusion.degradation import Downsample, Inpaint, make_keep
from difflab.metrics.restoration import (
    baseline,
    calibrated_temperature,
    diversity,
    label_ceiling,
    psnr,
    restoration_scores,
    ssim,
)


def images(n, seed, size=8):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_ssim_and_diversity_on_known_cases():
    x = images(4, 0)
    assert psnr(x, x) == math.inf and ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert psnr(x + 0.2, x) == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-4)  # MSE 0.04, range 2
    hole = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    hole[..., :2, :] = True
    shifted = x.clone()
    shifted[..., :2, :] += 0.5
    assert psnr(shifted, x, hole) == pytest.approx(10 * math.log10(4 / 0.25), abs=1e-4)
    assert ssim(-x, x) < 0.2
    same = x[:2, None].expand(2, 3, 1, 8, 8)
    assert diversity(same) == 0.0 and diversity(torch.randn(2, 3, 1, 8, 8)) > 0.5


def test_inpaint_baselines():
    train = images(50, 1)
    operator = Inpaint(make_keep("center", 8, box=4))
    y = operator.A(train[[7, 23]])
    nearest = baseline("nearest", operator, y, train)
    assert torch.equal(nearest, train[[7, 23]])  # the known pixels find the image itself
    mean = baseline("mean", operator, y, train)
    assert torch.allclose(mean[:, :, ~operator.keep[0, 0]], train.mean(0)[:, ~operator.keep[0, 0]].expand(2, 1, 16))
    assert torch.equal(baseline("zero", operator, y, train)[:, :, ~operator.keep[0, 0]], torch.zeros(2, 1, 16))
    with pytest.raises(ValueError, match="unknown baseline 'bicubic'"):
        baseline("bicubic", operator, y, train)


def test_superres_baselines_and_scores():
    x = images(3, 2)
    operator = Downsample(2)
    y = operator.A(x)
    nearest, bicubic = baseline("nearest", operator, y, x), baseline("bicubic", operator, y, x)
    assert nearest.shape == bicubic.shape == x.shape
    scores = restoration_scores(nearest, x, operator, y)
    assert scores["consistency_psnr"] > 100 and "psnr_hole" not in scores
    assert restoration_scores(bicubic, x, operator, y)["consistency_psnr"] < scores["consistency_psnr"]


def test_calibrated_temperature_undoes_overconfidence():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=generator)[:, 0]  # drawn from softmax(logits)
    assert calibrated_temperature(3 * logits, labels) == pytest.approx(3.0, rel=0.1)
    assert calibrated_temperature(logits / 2, labels) == pytest.approx(0.5, rel=0.1)


def blob_digits(n, seed):
    """8x8 images whose label (0-3) is the row of one bright 2x2 blob in the left half, on noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    x = torch.rand(n, 1, 8, 8, generator=generator) * 0.2 - 1
    for i, label in enumerate(labels.tolist()):
        x[i, 0, 2 * label:2 * label + 2, 1:3] = 1.0
    return x, labels


@pytest.mark.usefixtures("one_thread")
def test_label_ceiling_is_high_when_the_label_is_known_and_chance_when_it_is_hidden():
    train, train_labels = blob_digits(1000, 0)
    val, val_labels = blob_digits(200, 1)
    seen = label_ceiling(Inpaint(make_keep("right", 8)), train, train_labels, val, val_labels, 4, steps=60)
    hidden = label_ceiling(Inpaint(make_keep("left", 8)), train, train_labels, val, val_labels, 4, steps=60)
    assert seen["best_guess"] > 0.95 and seen["posterior"] > 0.9  # "right" is the hole: the blob is known
    assert hidden["best_guess"] < 0.45 and hidden["posterior"] < 0.35  # chance is 0.25
