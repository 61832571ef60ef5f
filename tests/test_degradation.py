"""Degradation operators: A, its pseudo-inverse, the range/null-space projection, masks."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from difflab.diffusion.degradation import (
    MASKS,
    DegradationError,
    Downsample,
    Inpaint,
    build_operator,
    hole_fraction,
    keep_from_png,
    make_keep,
)


def images(n=3, c=1, size=28, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def operator_matrix(operator, shape):
    d = int(np.prod(shape))
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    return operator.A(basis).reshape(d, -1).T


@pytest.mark.parametrize("operator", [Inpaint(make_keep("center", 8)), Downsample(2), Downsample(4)],
                         ids=["inpaint", "down2", "down4"])
def test_pinv_is_the_moore_penrose_pseudo_inverse(operator):
    shape = (1, 8, 8)
    a = operator_matrix(operator, shape)
    m = a.shape[0]
    y_basis = torch.eye(m, dtype=torch.float64).reshape(m, *operator.A(torch.zeros(1, *shape)).shape[1:])
    pinv = operator.A_pinv(y_basis).reshape(m, -1).T  # [d, m]
    assert torch.allclose(pinv, torch.linalg.pinv(a), atol=1e-12)


@pytest.mark.parametrize("operator", [Inpaint(make_keep("strokes", 28, generator=torch.Generator().manual_seed(1))),
                                      Downsample(2), Downsample(4), Downsample(7)],
                         ids=["inpaint", "down2", "down4", "down7"])
def test_projection_is_consistent_and_keeps_the_null_space(operator):
    x, other = images(seed=0), images(seed=1)
    y = operator.A(x)
    projected = operator.project(other, y)
    assert torch.allclose(operator.A(projected), y, atol=1e-6)  # A(project(x, y)) = y
    # The null-space part is other's: projecting x's measurement onto x gives x back.
    assert torch.allclose(operator.project(x, y), x, atol=1e-6)
    null_part = projected - operator.low_pass(projected)
    assert torch.allclose(null_part, other - operator.low_pass(other), atol=1e-6)


def test_inpaint_projection_copies_known_pixels_bit_for_bit():
    keep = make_keep("center", 28)
    x = images()
    y = Inpaint(keep).A(x)
    out = Inpaint(keep).project(images(seed=5), y)
    assert torch.equal(out[:, :, keep], x[:, :, keep])


def test_downsample_is_average_pooling_and_pinv_is_nearest():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = Downsample(2).A(x)
    assert torch.equal(y, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert torch.equal(Downsample(2).A_pinv(y)[0, 0, :2, :2], torch.full((2, 2), 2.5))


def test_masks_mean_what_they_say():
    assert not make_keep("center", 28)[7:21, 7:21].any() and make_keep("center", 28).sum() == 28 * 28 - 14 * 14
    assert make_keep("center", 28, box=6).sum() == 28 * 28 - 36
    assert not make_keep("top", 28)[:14].any() and make_keep("top", 28)[14:].all()
    assert not make_keep("bottom", 28)[14:].any() and make_keep("bottom", 28)[:14].all()
    assert not make_keep("left", 28)[:, :14].any() and make_keep("left", 28)[:, 14:].all()
    assert not make_keep("right", 28)[:, 14:].any() and make_keep("right", 28)[:, :14].all()
    rows = make_keep("rows", 28)
    assert rows[::2].all() and not rows[1::2].any()
    strokes = make_keep("strokes", 28, generator=torch.Generator().manual_seed(0))
    again = make_keep("strokes", 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(strokes, again) and 0.05 < (~strokes).float().mean() < 0.7
    assert hole_fraction(Inpaint(make_keep("left", 28))) == 0.5
    assert hole_fraction(Downsample(4)) == pytest.approx(15 / 16)
    assert set(MASKS) == {"center", "top", "bottom", "left", "right", "strokes", "rows"}


def test_png_masks_white_means_what_you_say(tmp_path):
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[5:10, 3:20] = 255
    path = tmp_path / "hole.png"
    iio.imwrite(path, pixels)
    keep = keep_from_png(path, 28)  # white = hole by default
    assert not keep[5:10, 3:20].any() and keep.sum() == 28 * 28 - 5 * 17
    assert torch.equal(keep_from_png(path, 28, white="keep"), ~keep)
    rgb = tmp_path / "rgb.png"
    iio.imwrite(rgb, np.repeat(pixels[..., None], 3, axis=-1))
    assert torch.equal(keep_from_png(rgb, 28), keep)
    assert torch.equal(build_operator("inpaint", mask=str(path), size=28).keep[0, 0], keep)


def test_bad_masks_say_what_is_wrong(tmp_path):
    grey = np.zeros((28, 28), dtype=np.uint8)
    grey[0, 0] = 128
    iio.imwrite(tmp_path / "grey.png", grey)
    with pytest.raises(DegradationError, match=r"not binary: it has grey levels \[128\]"):
        keep_from_png(tmp_path / "grey.png", 28)
    iio.imwrite(tmp_path / "small.png", np.zeros((14, 14), dtype=np.uint8))
    with pytest.raises(DegradationError, match="is 14x14 but the images are 28x28"):
        keep_from_png(tmp_path / "small.png", 28)
    with pytest.raises(DegradationError, match="does not exist"):
        keep_from_png(tmp_path / "missing.png", 28)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DegradationError, match="cannot read the mask file"):
        keep_from_png(tmp_path / "junk.png", 28)
    with pytest.raises(DegradationError, match="unknown mask 'centre'; allowed: center"):
        make_keep("centre", 28)
    with pytest.raises(DegradationError, match="must be a boolean tensor"):
        Inpaint(torch.ones(28, 28))
    with pytest.raises(DegradationError, match="the keep mask is 14x14 but the images are 28x28"):
        Inpaint(make_keep("center", 14)).check(images())


def test_a_factor_that_does_not_divide_the_size_is_an_error():
    with pytest.raises(DegradationError, match=r"factor=3 does not divide the image size 28x28; factors that do: "
                                               r"2, 4, 7, 14, 28"):
        Downsample(3).A(images())
    with pytest.raises(DegradationError, match="factor=3 does not divide"):
        build_operator("superres", factor=3, size=28)
    with pytest.raises(DegradationError, match="integer >= 1"):
        Downsample(0)
    with pytest.raises(DegradationError, match="must be 7x7, got 14x14"):
        Downsample(4).check_measurement(torch.zeros(1, 1, 14, 14), (28, 28))
