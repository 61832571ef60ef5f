"""Degradations as linear operators with a pseudo-inverse (the view of DDNM, Wang et al. 2023).

A measurement is ``y = A(x)``. Every operator also gives ``A_pinv`` (the Moore-Penrose
pseudo-inverse, A^+) and with it the range/null-space split ``x = A^+ A x + (I - A^+ A) x``:
``project(x, y)`` keeps the null-space part of ``x`` and takes the range-space part from
``y``, so ``A(project(x, y)) = y`` (DDNM eq. 9). Restoration methods (``restoration``)
only use these three functions, so any operator works with any method that allows it.

- ``Inpaint(keep)``: ``keep`` is True where a pixel is known and False in the hole. Names
  say what they mean: there is no bare "mask" whose 1 could mean either. ``A`` zeroes the
  hole, which is an orthogonal projection, so ``A^+ = A``; ``project`` copies the known
  pixels of ``y`` bit for bit.
- ``Downsample(factor)``: average pooling over ``factor x factor`` blocks. Each row of A
  holds f^2 entries 1/f^2, so A A^T = I / f^2 and A^+ = f^2 A^T, which copies each low-res
  pixel over its block (nearest upsampling): ``A(A^+ y) = y``.

Masks for 2-d images come from ``make_keep``: centre box, half planes, random brush
strokes, every other row, or a PNG file.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path

import torch
import torch.nn.functional as F

MASKS = ("center", "top", "bottom", "left", "right", "strokes", "rows")
# Which half of the image is the hole for each half mask.
_HALVES = {"top", "bottom", "left", "right"}


class DegradationError(ValueError):
    """A mask, factor or measurement that does not fit the images it is applied to."""


class Operator(abc.ABC):
    """A linear degradation ``y = A(x)`` on images ``[B, C, H, W]`` with its pseudo-inverse."""

    @abc.abstractmethod
    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the paper's name)
        """The measurement of ``x``."""

    @abc.abstractmethod
    def A_pinv(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """The least-norm image whose measurement is ``y`` (A^+ y)."""

    def check(self, x: torch.Tensor) -> None:
        """Raise ``DegradationError`` if images of ``x``'s shape cannot be degraded."""

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``A^+ y + (I - A^+ A) x``: x's null-space part with y's range-space part."""
        return x - self.A_pinv(self.A(x)) + self.A_pinv(y)

    def low_pass(self, x: torch.Tensor) -> torch.Tensor:
        """``A^+ A x``: the part of ``x`` the measurement sees (ILVR's phi_N for downsampling)."""
        return self.A_pinv(self.A(x))


class Inpaint(Operator):
    """Known pixels are those where ``keep`` is True; ``keep`` is ``[H, W]``, ``[C, H, W]`` or
    ``[B, C, H, W]`` (broadcast over the batch and channels)."""

    def __init__(self, keep: torch.Tensor) -> None:
        if keep.dtype != torch.bool:
            raise DegradationError(f"keep must be a boolean tensor (True = known pixel), got {keep.dtype}; "
                                   "build it with make_keep or keep_from_png.")
        if keep.ndim == 2:
            keep = keep[None, None]
        elif keep.ndim == 3:
            keep = keep[None]
        if keep.ndim != 4:
            raise DegradationError(f"keep must have 2 to 4 dims ([H, W] ... [B, C, H, W]), got shape "
                                   f"{tuple(keep.shape)}")
        self.keep = keep

    @property
    def hole(self) -> torch.Tensor:
        """True where pixels are unknown (to be filled)."""
        return ~self.keep

    def check(self, x: torch.Tensor) -> None:
        if self.keep.shape[-2:] != x.shape[-2:]:
            raise DegradationError(f"the keep mask is {self.keep.shape[-2]}x{self.keep.shape[-1]} but the images "
                                   f"are {x.shape[-2]}x{x.shape[-1]}: make the mask the images' size.")
        if self.keep.shape[1] not in (1, x.shape[1]) or self.keep.shape[0] not in (1, x.shape[0]):
            raise DegradationError(f"a keep mask of shape {tuple(self.keep.shape)} does not broadcast over images "
                                   f"of shape {tuple(x.shape)}: give it one channel, or one per image channel.")

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return self.keep.to(x.device)

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return torch.where(self._keep(x), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def A_pinv(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.A(y)

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # A selection: the range part is y itself on the known pixels. torch.where copies
        # them exactly, where the generic x - A^+Ax + A^+y would round.
        return torch.where(self._keep(x), y.to(x.dtype), x)

    def __repr__(self) -> str:
        known = self.keep.float().mean().item()
        return f"Inpaint(keep {tuple(self.keep.shape[-2:])}, {known:.0%} known)"


class Downsample(Operator):
    """Average pooling by ``factor`` (super-resolution: y has H / factor x W / factor pixels)."""

    def __init__(self, factor: int) -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise DegradationError(f"the downsampling factor must be an integer >= 1, got {factor!r}")
        self.factor = factor

    def check(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            divisors = [f for f in range(2, min(h, w) + 1) if h % f == 0 and w % f == 0]
            raise DegradationError(f"factor={self.factor} does not divide the image size {h}x{w}; factors that "
                                   f"do: {', '.join(map(str, divisors)) or 'none'}.")

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        self.check(x)
        return F.avg_pool2d(x, self.factor) if self.factor > 1 else x

    def A_pinv(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        if self.factor == 1:
            return y
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def check_measurement(self, y: torch.Tensor, image_size: tuple[int, int]) -> None:
        """A low-res input must be exactly the image size divided by the factor."""
        expected = (image_size[0] // self.factor, image_size[1] // self.factor)
        if tuple(y.shape[-2:]) != expected:
            raise DegradationError(f"a x{self.factor} low-res input for {image_size[0]}x{image_size[1]} images must "
                                   f"be {expected[0]}x{expected[1]}, got {y.shape[-2]}x{y.shape[-1]}.")

    def __repr__(self) -> str:
        return f"Downsample(x{self.factor})"


# --------------------------------------------------------------------------- masks

def make_keep(kind: str, size: int | tuple[int, int], *, box: int | None = None,
              generator: torch.Generator | None = None, strokes: int = 4, width: int | None = None) -> torch.Tensor:
    """A boolean ``[H, W]`` mask that is True on the known pixels.

    - ``center``: a hole of ``box x box`` in the middle (default: half the side);
    - ``top`` / ``bottom`` / ``left`` / ``right``: that half of the image is the hole;
    - ``strokes``: ``strokes`` random brush strokes (thick polylines of ``width`` pixels,
      default a tenth of the side) are the hole, drawn with ``generator``;
    - ``rows``: every other row (1, 3, 5, ...) is the hole.
    """
    h, w = (size, size) if isinstance(size, int) else size
    keep = torch.ones(h, w, dtype=torch.bool)
    if kind == "center":
        side = box if box is not None else min(h, w) // 2
        if not 1 <= side <= min(h, w):
            raise DegradationError(f"box={side} must lie in [1, {min(h, w)}] for {h}x{w} images")
        top, left = (h - side) // 2, (w - side) // 2
        keep[top:top + side, left:left + side] = False
    elif kind in _HALVES:
        rows, cols = {"top": (slice(0, h // 2), slice(None)), "bottom": (slice(h - h // 2, h), slice(None)),
                      "left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w - w // 2, w))}[kind]
        keep[rows, cols] = False
    elif kind == "strokes":
        keep = ~_brush_strokes(h, w, strokes, width or max(1, round(min(h, w) / 10)), generator)
    elif kind == "rows":
        keep[1::2] = False
    else:
        raise DegradationError(f"unknown mask {kind!r}; allowed: {', '.join(MASKS)}, or the path of a PNG file")
    return keep


def _brush_strokes(h: int, w: int, strokes: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """True on ``strokes`` random polylines of 3-5 segments, each ``width`` pixels thick."""
    rows = torch.arange(h, dtype=torch.float32)[:, None]
    cols = torch.arange(w, dtype=torch.float32)[None, :]
    hole = torch.zeros(h, w, dtype=torch.bool)
    scale = torch.tensor([h - 1, w - 1], dtype=torch.float32)
    for _ in range(strokes):
        vertices = int(torch.randint(4, 7, (1,), generator=generator))
        points = torch.rand(vertices, 2, generator=generator) * scale
        for start, end in zip(points[:-1], points[1:]):
            # Distance of every pixel centre to the segment start-end.
            direction = end - start
            length_sq = direction.pow(2).sum().clamp(min=1e-6)
            along = ((rows - start[0]) * direction[0] + (cols - start[1]) * direction[1]) / length_sq
            along = along.clamp(0.0, 1.0)
            dist_sq = (rows - start[0] - along * direction[0]) ** 2 + (cols - start[1] - along * direction[1]) ** 2
            hole |= dist_sq <= (width / 2) ** 2
    return hole


def keep_from_png(path: str | Path, size: int | tuple[int, int], white: str = "hole") -> torch.Tensor:
    """The keep mask drawn in a black-and-white PNG file of the images' size.

    ``white`` says what the white pixels mean: ``"hole"`` (the usual convention of
    inpainting tools: paint what to fill) or ``"keep"``. Grey levels are an error.
    """
    import imageio.v3 as iio
    import numpy as np

    if white not in ("hole", "keep"):
        raise DegradationError(f"white={white!r} must say what white pixels are: hole or keep")
    path = Path(path)
    if not path.is_file():
        raise DegradationError(f"mask file {path} does not exist; give a PNG file or one of: {', '.join(MASKS)}")
    try:
        pixels = np.asarray(iio.imread(path))
    except Exception as error:  # imageio raises many kinds on a bad file
        raise DegradationError(f"cannot read the mask file {path} as an image ({error}).") from error
    if pixels.ndim == 3:
        if pixels.shape[-1] == 4:
            pixels = pixels[..., :3]
        if not (pixels == pixels[..., :1]).all():
            raise DegradationError(f"mask file {path} has colours; draw it in black and white only.")
        pixels = pixels[..., 0]
    h, w = (size, size) if isinstance(size, int) else size
    if pixels.shape != (h, w):
        raise DegradationError(f"mask file {path} is {pixels.shape[0]}x{pixels.shape[1]} but the images are "
                               f"{h}x{w}: draw the mask at the images' size.")
    top = 65535 if pixels.dtype == np.uint16 else (1 if pixels.dtype == bool else 255)
    values = np.unique(pixels)
    if not set(values.tolist()) <= {0, top}:
        grey = [v for v in values.tolist() if v not in (0, top)][:3]
        raise DegradationError(f"mask file {path} is not binary: it has grey levels {grey} besides black (0) and "
                               f"white ({top}). Threshold it to pure black and white.")
    white_pixels = torch.from_numpy(pixels == top)
    return ~white_pixels if white == "hole" else white_pixels


def build_operator(kind: str, *, mask: str = "center", factor: int = 4, size: int | tuple[int, int] = 28,
                   box: int | None = None, mask_white: str = "hole",
                   generator: torch.Generator | None = None) -> Operator:
    """``kind="inpaint"``: an ``Inpaint`` of ``mask`` (a name from MASKS or a PNG path);
    ``kind="superres"``: a ``Downsample(factor)`` checked against ``size``."""
    if kind == "inpaint":
        if mask in MASKS or not (Path(mask).suffix or Path(mask).exists()):
            return Inpaint(make_keep(mask, size, box=box, generator=generator))  # a name (or an unknown one)
        return Inpaint(keep_from_png(mask, size, white=mask_white))
    if kind == "superres":
        operator = Downsample(factor)
        h, w = (size, size) if isinstance(size, int) else size
        operator.check(torch.empty(1, 1, h, w))
        return operator
    raise DegradationError(f"unknown degradation {kind!r}; allowed: inpaint, superres")


def hole_fraction(operator: Operator) -> float:
    """Fraction of pixels a restoration must invent: the hole, or 1 - 1/f^2 for downsampling."""
    if isinstance(operator, Inpaint):
        return float(operator.hole.float().mean())
    if isinstance(operator, Downsample):
        return 1.0 - 1.0 / operator.factor**2
    return math.nan
