"""Tests for difflab.data: sources, the in-memory dataset and the datamodule."""

from __future__ import annotations
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from difflab.data import (
    DATASETS,
    DatasetUnavailableError,
    ImageDataModule,
    collate_images,
    dataset_info,
    real_images,
)


@pytest.fixture(scope="module")
def mnist5k() -> ImageDataModule:
    datamodule = ImageDataModule("mnist5k", batch_size=128)
    datamodule.setup("fit")
    return datamodule


def asymmetric_index(images: torch.Tensor) -> int:
    """An image that differs from its mirror, so a flip is visible."""
    differs = (images != images.flip(-1)).flatten(1).any(dim=1)
    return int(differs.nonzero()[0])


# --- named tensor datasets ---------------------------------------------------------------


def test_mnist5k_properties_are_known_before_setup():
    datamodule = ImageDataModule()
    assert datamodule.train_set is None
    assert (datamodule.num_classes, datamodule.channels, datamodule.image_size) == (10, 1, 28)
    assert datamodule.class_names == [str(d) for d in range(10)]


def test_mnist5k_shapes_range_split_and_labels(mnist5k):
    train, val = mnist5k.train_set, mnist5k.val_set
    assert (len(train), len(val)) == (4500, 500)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    everything = torch.cat([train.images, val.images])
    assert everything.min().item() == pytest.approx(-1.0)
    assert everything.max().item() == pytest.approx(1.0)
    labels = torch.cat([train.labels, val.labels])
    assert sorted(labels.unique().tolist()) == list(range(10))
    # the split is a random permutation, not the label-sorted order of the source file
    assert len(val.labels[:50].unique()) > 5


def test_split_is_seeded(mnist5k):
    same = ImageDataModule("mnist5k", seed=0)
    same.setup("fit")
    other = ImageDataModule("mnist5k", seed=1)
    other.setup("fit")
    assert torch.equal(same.val_set.images, mnist5k.val_set.images)
    assert torch.equal(same.train_set.labels, mnist5k.train_set.labels)
    assert not torch.equal(other.val_set.images, mnist5k.val_set.images)


def test_digits_are_8x8_in_unit_range():
    datamodule = ImageDataModule("digits", batch_size=64)
    datamodule.setup("fit")
    images = torch.cat([datamodule.train_set.images, datamodule.val_set.images])
    assert images.shape == (1797, 1, 8, 8)
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert (datamodule.num_classes, datamodule.image_size) == (10, 8)


def test_resize_and_channel_conversion_of_tensor_datasets():
    datamodule = ImageDataModule("digits", image_size=16, channels=3, batch_size=32)
    assert (datamodule.image_size, datamodule.channels) == (16, 3)
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (32, 3, 16, 16)
    assert labels.shape == (32,) and labels.dtype == torch.int64
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images[:, 0], images[:, 2])  # grey copied to every channel


def test_dataset_info_for_torchvision_sets():
    info = dataset_info("cifar10")
    assert (info.image_size, info.channels, info.num_classes) == (32, 3, 10)
    assert "airplane" in info.class_names and not info.offline


# --- batching and flips ------------------------------------------------------------------


def test_getitems_equals_stacked_single_items(mnist5k):
    dataset = mnist5k.val_set
    indices = [5, 0, 499, 17, 17]
    images, labels = collate_images(dataset.__getitems__(indices))
    singles = collate_images([dataset[i] for i in indices])
    assert torch.equal(images, singles[0]) and torch.equal(labels, singles[1])


def test_val_loader_is_ordered_and_uses_eval_batch_size():
    datamodule = ImageDataModule("digits", batch_size=64, eval_batch_size=50)
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (50, 1, 8, 8)
    assert torch.equal(images, datamodule.val_set.images[:50])
    assert torch.equal(labels, datamodule.val_set.labels[:50])


def test_train_loader_shuffles_and_drops_last(mnist5k):
    loader = mnist5k.train_dataloader()
    assert len(loader) == 4500 // 128
    first_images, _ = next(iter(loader))
    assert not torch.equal(first_images, mnist5k.train_set.images[:128])
    keep_last = ImageDataModule("digits", batch_size=100, drop_last=False)
    sizes = [len(labels) for _, labels in keep_last.train_dataloader()]
    assert sum(sizes) == len(keep_last.train_set) and sizes[-1] < 100


def test_hflip_flips_training_images_only():
    torch.manual_seed(0)
    datamodule = ImageDataModule("digits", hflip=True, batch_size=64)
    datamodule.setup("fit")
    train = datamodule.train_set
    i = asymmetric_index(train.images)
    original, mirrored = train.images[i], train.images[i].flip(-1)
    drawn, _ = train.__getitems__([i] * 64)
    is_original = (drawn == original).flatten(1).all(dim=1)
    is_mirrored = (drawn == mirrored).flatten(1).all(dim=1)
    assert bool((is_original | is_mirrored).all())
    assert is_original.any() and is_mirrored.any()  # 2**-63 chance of a false failure
    single = torch.stack([train[i][0] for _ in range(64)])
    assert (single == mirrored).flatten(1).all(dim=1).any()
    val = datamodule.val_set
    j = asymmetric_index(val.images)
    batch, _ = val.__getitems__([j] * 64)
    assert torch.equal(batch, val.images[j].expand_as(batch))


def test_real_images_are_the_first_unflipped_training_images():
    datamodule = ImageDataModule("digits", hflip=True, batch_size=64)
    first = real_images(datamodule, 16)
    assert first.shape == (16, 1, 8, 8)
    assert torch.equal(first, datamodule.train_set.images[:16])
    assert torch.equal(real_images(datamodule, 4, split="val"), datamodule.val_set.images[:4])
    with pytest.raises(ValueError, match="holds"):
        real_images(datamodule, 10_000)


def test_worker_loader_with_persistent_workers():
    datamodule = ImageDataModule("digits", batch_size=64, num_workers=1, persistent_workers=True)
    loader = datamodule.val_dataloader()
    assert loader.persistent_workers
    images, _ = next(iter(loader))
    assert torch.equal(images, datamodule.val_set.images[:64])
    assert not ImageDataModule("digits", persistent_workers=True).val_dataloader().persistent_workers


# --- bad configuration ---------------------------------------------------------------------


def test_unknown_name_lists_the_allowed_names():
    with pytest.raises(ValueError) as error:
        ImageDataModule("imagenet")
    assert all(name in str(error.value) for name in DATASETS)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"channels": 2}, "channels"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": -4}, "image_size"),
    ],
)
def test_bad_arguments_are_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        ImageDataModule("digits", **arguments)


def test_batch_larger_than_train_split_is_a_clear_error():
    with pytest.raises(ValueError, match="lower data.batch_size"):
        ImageDataModule("digits", batch_size=4096).setup("fit")


# --- image folders -------------------------------------------------------------------------


def write_image(path, mode: str, size: tuple[int, int], colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def class_tree(tmp_path):
    """Two classes: grey PNGs in 'cats', red RGB JPEGs and a BMP in 'dogs', mixed sizes."""
    for k in range(3):
        write_image(tmp_path / "cats" / f"cat{k}.png", "L", (20 + k, 30), 200)
    write_image(tmp_path / "dogs" / "dog0.jpg", "RGB", (40, 24), (255, 0, 0))
    write_image(tmp_path / "dogs" / "dog1.JPEG", "RGB", (12, 12), (255, 0, 0))
    write_image(tmp_path / "dogs" / "dog2.bmp", "RGB", (33, 17), (255, 0, 0))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_with_class_subfolders(class_tree):
    datamodule = ImageDataModule("folder", path=str(class_tree), image_size=16, val_fraction=0.0, batch_size=2)
    assert datamodule.num_classes == 2 and datamodule.class_names == ["cats", "dogs"]
    assert datamodule.channels == 3 and datamodule.image_size == 16
    datamodule.setup("fit")
    images, labels = datamodule.train_set.images, datamodule.train_set.labels
    assert images.shape == (6, 3, 16, 16)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    cats, dogs = images[labels == 0], images[labels == 1]
    assert torch.allclose(cats, torch.full_like(cats, 200 / 127.5 - 1))  # grey copied to RGB
    assert torch.allclose(dogs[:, 0], torch.ones_like(dogs[:, 0]), atol=0.05)  # red stays red
    assert dogs[:, 1].max() < -0.9


def test_folder_converted_to_grey(class_tree):
    datamodule = ImageDataModule("folder", path=str(class_tree), image_size=8, channels=1, val_fraction=0.0, batch_size=2)
    datamodule.setup("fit")
    images, labels = datamodule.train_set.images, datamodule.train_set.labels
    assert images.shape == (6, 1, 8, 8)
    red_as_grey = round(0.299 * 255) / 127.5 - 1  # PIL 'L' luma of pure red
    assert torch.allclose(images[labels == 1], torch.tensor(red_as_grey), atol=0.05)


def test_flat_folder_is_one_class(tmp_path):
    write_image(tmp_path / "a.png", "RGB", (10, 14), (0, 0, 255))
    write_image(tmp_path / "b.webp", "L", (9, 9), 0)
    datamodule = ImageDataModule("folder", path=str(tmp_path), image_size=4, val_fraction=0.0, batch_size=1)
    assert datamodule.num_classes == 1
    datamodule.setup("fit")
    assert datamodule.train_set.images.shape == (2, 3, 4, 4)
    assert datamodule.train_set.labels.tolist() == [0, 0]


def test_corrupt_image_names_the_file(tmp_path):
    write_image(tmp_path / "good.png", "RGB", (8, 8), (1, 2, 3))
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(300))
    datamodule = ImageDataModule("folder", path=str(tmp_path), image_size=8, val_fraction=0.0, batch_size=1)
    with pytest.raises(ValueError, match="broken.png") as error:
        datamodule.setup("fit")
    assert "remove" in str(error.value)


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataModule("folder", path=str(tmp_path / "nowhere"), image_size=8)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        ImageDataModule("folder", path=str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match="data.path"):
        ImageDataModule("folder", image_size=8)


# --- torchvision datasets without network ------------------------------------------------


@pytest.mark.parametrize(
    "name, subdir, a_file",
    [
        ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw", "train-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py", "data_batch_1"),
    ],
)
def test_missing_files_without_download(tmp_path, name, subdir, a_file):
    datamodule = ImageDataModule(name, data_dir=str(tmp_path), download=False)
    datamodule.prepare_data()  # must not try the network
    with pytest.raises(DatasetUnavailableError) as error:
        datamodule.setup("fit")
    message = str(error.value)
    assert str(tmp_path.resolve() / subdir) in message
    assert a_file in message and name in message
    assert "data=mnist5k" in message and "data=digits" in message


@pytest.mark.parametrize(
    "failure",
    [URLError("[Errno -2] Name or service not known"), RuntimeError("Error downloading train-images-idx3-ubyte.gz")],
)
def test_failed_download_is_explained(tmp_path, monkeypatch, failure):
    def offline_dataset(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline_dataset)
    datamodule = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), download=True)
    with pytest.raises(DatasetUnavailableError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    assert "could not download" in message
    assert str((tmp_path / "data" / "MNIST" / "raw").resolve()) in message
    assert "data=mnist5k" in message and type(failure).__name__ in message
    assert error.value.__cause__ is failure


def test_wide_images_are_scaled_not_clipped_and_bad_values_refused(tmp_path):
    from difflab.data.sources import PixelValueError, read_image

    ramp = np.arange(64, dtype=np.float64).reshape(8, 8) / 63
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "wide.png")  # 16-bit PNG
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "unit.tif")  # float in [0, 1]
    for name in ("wide.png", "unit.tif"):
        pixels = read_image(tmp_path / name, 8, 1)[..., 0].astype(np.float64)
        assert np.abs(pixels - ramp * 255).max() <= 1, name  # PIL's own convert would clip these to 255 / 0
    nan = np.zeros((8, 8), dtype=np.float32)
    nan[2, 3] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    Image.fromarray(np.full((8, 8), 7e5, dtype=np.float32), mode="F").save(tmp_path / "big.tif")
    with pytest.raises(PixelValueError, match=r"nan.tif' has 1 NaN or infinite pixels"):
        read_image(tmp_path / "nan.tif", 8, 3)
    with pytest.raises(PixelValueError, match=r"from 700000 to 700000, outside 0-1, 0-255 and 0-65535"):
        read_image(tmp_path / "big.tif", 8, 1)


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    from difflab.data.order import EpochOrder

    order = EpochOrder(10, seed=2**64 - 5, flips=True)  # any seed torch.initial_seed() can return
    first, second = order.order(0), order.order(1)
    assert sorted((first % 10).tolist()) == list(range(10)) and not torch.equal(first, second)
    assert bool((first >= 10).any()) and bool((first < 10).any())  # some images flipped, some not
    assert torch.equal(EpochOrder(10, seed=2**64 - 5, flips=True).order(1), second)  # no global RNG in it
    assert not torch.equal(EpochOrder(10, seed=3, flips=True).order(1), second)
    order.set_epoch(1)
    assert list(order) == second.tolist()
    order.start_at(1, 4)  # a run resumed after 4 images of epoch 1
    assert list(order) == second[4:].tolist()
    assert list(order) == second.tolist()  # the epoch's next pass starts at its beginning
    order.start_at(1, 4)
    order.set_epoch(2)  # the resumed epoch had ended: epoch 2 is whole
    assert list(order) == order.order(2).tolist()


def test_flips_drawn_by_the_order_are_the_flips_served():
    from difflab.data.datamodule import InMemoryImages

    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    data = InMemoryImages(images, torch.tensor([0, 1]), hflip=True)
    data.flips_in_index = True
    batch = data.__getitems__([1, 2])  # image 1 as it is, image 0 flipped
    assert torch.equal(batch.images[0], images[1]) and torch.equal(batch.images[1], images[0].flip(-1))
    assert batch.labels.tolist() == [1, 0]
    assert torch.equal(data[2][0], images[0].flip(-1)) and torch.equal(data[1][0], images[1])
