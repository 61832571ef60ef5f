"""Image datasets for diffusion training: named sources and one LightningDataModule."""

from difflab.data.datamodule import ImageDataModule, InMemoryImages, collate_images, real_images
from difflab.data.sources import (
    DATASETS,
    BadImageError,
    DatasetInfo,
    DatasetUnavailableError,
    dataset_info,
    scan_image_folder,
)

__all__ = [
    "BadImageError",
    "DATASETS",
    "DatasetInfo",
    "DatasetUnavailableError",
    "ImageDataModule",
    "InMemoryImages",
    "collate_images",
    "dataset_info",
    "real_images",
    "scan_image_folder",
]
