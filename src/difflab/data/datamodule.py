"""The LightningDataModule: one in-memory tensor per split, batched with one index op."""

from __future__ import annotations

from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from difflab.data import sources
from difflab.data.order import EpochOrder
from difflab.data.sources import DATASETS


class ImageBatch(NamedTuple):
    """A whole batch fetched at once by ``InMemoryImages.__getitems__``."""

    images: torch.Tensor  # float32 [B, C, H, W] in [-1, 1]
    labels: torch.Tensor  # int64 [B]


class InMemoryImages(Dataset):
    """Images already in [-1, 1] held as one tensor; optional random horizontal flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, hflip: bool = False):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels: they must match")
        self.images = images
        self.labels = labels
        self.hflip = hflip
        # Set by the datamodule when an EpochOrder draws the flips: an index >= len names the
        # image at index - len, flipped (see difflab.data.order), and nothing is drawn here.
        self.flips_in_index = False

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flips_in_index:
            image = self.images[index % len(self)]
            return (image.flip(-1) if index >= len(self) else image), self.labels[index % len(self)]
        image = self.images[index]
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]

    def __getitems__(self, indices: list[int]) -> ImageBatch:
        # PyTorch's fetcher calls this with a batch's indices when it exists, so a batch
        # costs one gather instead of B Python calls plus a stack.
        index = torch.as_tensor(indices, dtype=torch.int64)
        flip = None
        if self.flips_in_index:  # the order drew the flips, so a resumed run flips the same images
            flip, index = index >= len(self), index % len(self)
        elif self.hflip:
            flip = torch.rand(len(index)) < 0.5
        # index_select, not images[index]: the advanced-indexing kernel is ~5x slower here.
        images = self.images.index_select(0, index)
        if flip is not None:
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return ImageBatch(images, self.labels.index_select(0, index))


def collate_images(batch: ImageBatch | list) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass a batch from ``__getitems__`` through; stack a list of single items as usual."""
    if isinstance(batch, ImageBatch):
        return batch.images, batch.labels
    images, labels = default_collate(batch)
    return images, labels


class ImageDataModule(L.LightningDataModule):
    """Named image datasets as (image, label) batches: images float32 [-1, 1], labels int64.

    ``num_classes``, ``channels``, ``image_size`` and ``class_names`` are known right after
    construction (a folder is scanned by file name), so a model can be built before setup.
    """

    def __init__(
        self,
        name: str = "mnist5k",
        data_dir: str = "data",
        path: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        hflip: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        download: bool = True,
        drop_last: bool = True,
    ):
        super().__init__()
        sources.check_dataset_name(name)
        _check_arguments(image_size, channels, batch_size, eval_batch_size, val_fraction, num_workers)
        self.save_hyperparameters()
        self.name = name
        self.path = path
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.hflip = hflip
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.drop_last = drop_last
        self._folder: sources.ImageFolderIndex | None = None
        self._order: EpochOrder | None = None  # the training order of a one-device run
        self._resume_order: dict | None = None  # where a resumed run's order goes on (load_state_dict)
        if name == "folder":
            if path is None or image_size is None:
                raise ValueError(
                    "dataset 'folder' needs data.path (a directory of images) and "
                    "data.image_size (images are resized and centre-cropped to it)"
                )
            self._folder = sources.scan_image_folder(path)
            self._image_size, self._channels = image_size, channels or 3
            self._class_names = list(self._folder.class_names)
        else:
            info = sources.dataset_info(name)
            self._image_size = image_size or info.image_size
            self._channels = channels or info.channels
            self._class_names = list(info.class_names)
        self.train_set: InMemoryImages | None = None
        self.val_set: InMemoryImages | None = None
        self._served: dict[str, InMemoryImages] | None = None  # see serve()

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def image_size(self) -> int:
        return self._image_size

    def prepare_data(self) -> None:
        # Lightning runs this once per node before setup: the only place that downloads.
        if self.name in ("mnist", "fashion_mnist", "cifar10") and self.download:
            sources.download_torchvision(self.name, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return  # fit, validate and test all share the one split
        images, labels = self._load()
        images = sources.resize_square(sources.match_channels(images, self._channels), self._image_size)
        # A fixed permutation from `seed` alone: the same split on every run and every rank.
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(len(images) * self.val_fraction)
        train, val = order[n_val:], order[:n_val]
        if len(train) < (self.batch_size if self.drop_last else 1):
            raise ValueError(
                f"the training split of {self.name!r} has {len(train)} images, fewer than "
                f"batch_size={self.batch_size} with drop_last=true: lower data.batch_size, "
                "lower data.val_fraction or set data.drop_last=false"
            )
        self.train_set = InMemoryImages(images[train], labels[train], hflip=self.hflip)
        self.val_set = InMemoryImages(images[val], labels[val], hflip=False)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "mnist5k":
            return sources.load_mnist5k()
        if self.name == "digits":
            return sources.load_digits()
        if self.name == "folder":
            return sources.load_image_folder(self._folder, self._image_size, self._channels)
        return sources.load_torchvision(self.name, self.data_dir, self.download)

    def split(self, split: str) -> InMemoryImages:
        """The ``"train"`` or ``"val"`` dataset, setting up first if needed."""
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}: use 'train' or 'val'")
        if self.train_set is None:
            self.setup("fit")
        return self.train_set if split == "train" else self.val_set

    def serve(self, train: torch.Tensor, val: torch.Tensor) -> None:
        """Let the loaders serve these tensors, one row per image of each split and with its
        label, instead of the images (e.g. a first stage's cached latents). `split()` still
        returns the images, for grids and metrics. Flips are off: a flipped latent is not
        the latent of the flipped image."""
        for name, tensor in (("train", train), ("val", val)):
            if len(tensor) != len(self.split(name)):
                raise ValueError(f"serve: {len(tensor)} rows for the {len(self.split(name))} {name} images")
        self._served = {"train": InMemoryImages(train, self.train_set.labels),
                        "val": InMemoryImages(val, self.val_set.labels)}

    @property
    def serves_other_inputs(self) -> bool:
        """True once `serve` replaced what the loaders serve."""
        return self._served is not None

    def _loader_set(self, split: str) -> InMemoryImages:
        return self._served[split] if self._served else self.split(split)

    def train_dataloader(self) -> DataLoader:
        dataset = self._loader_set("train")
        trainer = self.trainer
        if trainer is None or trainer.world_size > 1:
            # Outside a trainer, and under DDP (Lightning's DistributedSampler: its order is a
            # function of the seed and the epoch too, but a resume restarts the epoch).
            return self._loader(dataset, self.batch_size, shuffle=True, drop_last=self.drop_last)
        # One device: an order that resumes mid-epoch, seeded by the run's seed (seed_everything).
        self._order = EpochOrder(len(dataset), seed=torch.initial_seed(), flips=dataset.hflip)
        dataset.flips_in_index = dataset.hflip
        self._resume()
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self._order, **self._loader_options(self.drop_last))

    # -- resume: where the training order is travels with the checkpoint -------------------
    def state_dict(self) -> dict:
        if self._order is None or self.trainer is None:
            return {}
        # Batches trained in this epoch (the trainer's count: the loader itself runs ahead).
        batches = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        return {"order": {"seed": self._order.seed, "epoch": self._order.epoch, "batches": batches}}

    def load_state_dict(self, state: dict) -> None:
        self._resume_order = state.get("order")
        self._resume()  # a loader built before the restore (some strategies restore after setup)

    def _resume(self) -> None:
        if self._order is not None and self._resume_order is not None:
            state, self._resume_order = self._resume_order, None
            self._order.seed = int(state["seed"])
            self._order.start_at(int(state["epoch"]), int(state["batches"]) * self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._loader_set("val"), self.eval_batch_size, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **self._loader_options(drop_last))

    def _loader_options(self, drop_last: bool) -> dict:
        return {"drop_last": drop_last, "collate_fn": collate_images, "num_workers": self.num_workers,
                "pin_memory": self.pin_memory,
                # Each iterator draws its workers' seed from this, not from the global RNG, so
                # building a loader (a resume, a validation run again) moves no training noise.
                "generator": torch.Generator().manual_seed(torch.initial_seed() % 2**63),
                # DataLoader refuses persistent workers without workers.
                "persistent_workers": self.persistent_workers and self.num_workers > 0}


def _check_arguments(image_size, channels, batch_size, eval_batch_size, val_fraction, num_workers) -> None:
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size={image_size}: use a positive size, or null for the native one")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels}: use 1 (grey), 3 (RGB) or null for the native count")
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise ValueError(f"batch_size={batch_size}, eval_batch_size={eval_batch_size}: use positive sizes")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: use a fraction in [0, 1)")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: use 0 (load in the main process) or more")


def real_images(datamodule: ImageDataModule, n: int, split: str = "train") -> torch.Tensor:
    """The first ``n`` images of a split (fixed by the seed, never flipped), for grids and metrics."""
    dataset = datamodule.split(split)
    if not 0 < n <= len(dataset):
        raise ValueError(f"asked for {n} real images but the {split} split holds {len(dataset)}")
    return dataset.images[:n].clone()


__all__ = ["DATASETS", "ImageBatch", "ImageDataModule", "InMemoryImages", "collate_images", "real_images"]
