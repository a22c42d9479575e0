"""User data from folders on disk, in torchvision's ImageFolder layout (``<dir>/<class name>/<image>``)."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, has_file_allowed_extension

from datamodules.base import DCCCLDataModule, SplitData
from datamodules.transforms import TrainAugmentation, resize_before_crop, timm_data_config, timm_transform
from dcccl.errors import ConfigError, DataError, MissingFileError
from dcccl.federated.class_split import ClassSplit, DataPartition
from dcccl.federated.partitioners import DevicePartitioner


def class_names(*roots: Path) -> list[str]:
    """Sorted union of the class-folder names found under ``roots``."""
    names: set[str] = set()
    for root in roots:
        if not root.is_dir():
            raise MissingFileError(f"data folder not found: {root}")
        names.update(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    return sorted(names)


class UnreadableImageError(DataError):
    """Image files of a data folder that cannot be read as images."""


# PIL reports unreadable files as OSError (UnidentifiedImageError, truncation), SyntaxError or ValueError.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError)
# Folders whose every image header was read once in this process (a pipeline builds a DataModule per stage).
_CHECKED_FOLDERS: set[tuple[str, int]] = set()


def _holds_image(folder: Path) -> bool:
    """Whether ``folder`` holds an image file anywhere below it (ImageFolder searches class folders recursively)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(has_file_allowed_extension(name, IMG_EXTENSIONS) for name in files):
            return True
    return False


def empty_class_folders(root: Path) -> list[Path]:
    """The class folders under ``root`` that hold no image file."""
    return [entry for entry in sorted(root.iterdir())
            if entry.is_dir() and not entry.name.startswith(".") and not _holds_image(entry)]


def unreadable_images(paths: Iterable[str]) -> list[tuple[str, str]]:
    """The files among ``paths`` that PIL cannot read as images, each with the reason.

    Reads each file's header and lets PIL verify what it can without decoding (e.g. PNG chunk checksums).
    """
    unreadable = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except _IMAGE_ERRORS as err:  # PIL's reason without the file name, which the caller reports anyway
            unreadable.append((path, str(err).replace(f" '{path}'", "").strip() or type(err).__name__))
    return unreadable


def load_image(path: str) -> Any:
    """ImageFolder's loader (an RGB PIL image); a file that cannot be decoded is named in the error."""
    try:
        return default_loader(path)
    except _IMAGE_ERRORS as err:
        raise UnreadableImageError(f"cannot read image {path} ({err}): fix or remove the file") from err


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB")


class GlobalClassImageFolder(ImageFolder):
    """An ImageFolder whose class indices come from a shared name->index map, not from its own folders.

    The cloud folder, the device folder and the test folder hold different classes; the same class
    name must get the same index in all three.

    Args:
        root: Folder with one sub-folder per class.
        class_to_idx: Global map from class name to index.
        transform: Transform applied to every image.
    """

    def __init__(
        self, root: Path, class_to_idx: dict[str, int], transform: Optional[Callable[..., Any]] = None
    ) -> None:
        self._global_class_to_idx = class_to_idx
        super().__init__(str(root), transform=transform, loader=load_image, allow_empty=True)

    def check_images(self) -> None:
        """Raise :class:`UnreadableImageError` naming the files of this folder that cannot be read as images."""
        key = (self.root, len(self.samples))
        if key in _CHECKED_FOLDERS:
            return
        unreadable = unreadable_images(path for path, _ in self.samples)
        if unreadable:
            named = ", ".join(path for path, _ in unreadable[:5]) + (", ..." if len(unreadable) > 5 else "")
            raise UnreadableImageError(
                f"{len(unreadable)} file(s) in {self.root} cannot be read as images: {named} "
                f"(first: {unreadable[0][1]}): fix or remove them"
            )
        _CHECKED_FOLDERS.add(key)

    def with_transform(self, transform: Callable[..., Any]) -> GlobalClassImageFolder:
        """The same samples, in the same order, through ``transform`` (the folder is not indexed again)."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """The global classes, whatever this folder holds."""
        return sorted(self._global_class_to_idx, key=self._global_class_to_idx.__getitem__), self._global_class_to_idx


def shared_images(cloud: Iterable[str], device: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of a cloud image and a device image that are the same file (the same path once links are resolved) or
    hold the same bytes (a copy)."""
    def digests(paths: Iterable[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for path in paths:
            real = os.path.realpath(path)
            found.setdefault(real, path)
            with open(real, "rb") as file:
                found.setdefault("sha256:" + hashlib.sha256(file.read()).hexdigest(), path)
        return found

    cloud_keys, device_keys = digests(cloud), digests(device)
    pairs = {(cloud_keys[key], device_keys[key]) for key in cloud_keys.keys() & device_keys.keys()}
    return sorted(pairs)


class ImageFolderDataModule(DCCCLDataModule):
    """Cloud, device and test images from three folders; class indices are global across them.

    The classes a side holds are the class folders with at least one image in its folder. Images of
    any size and channel count are converted to ``channels`` channels and resized to ``image_size``.

    Args:
        cloud_dir: Training images held on the cloud.
        device_dir: Training images held on the device.
        test_dir: Test images of every class (cloud-side and device-side).
        image_size: Side length images are resized to.
        channels: 1 (grey-scale) or 3 (RGB).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (``null``: one per CPU core but one, at most 8).
        seed: Seed of the fleet's partition (the folders fix the cloud/device/test split).
        partition: Pin the training partition instead of taking it from the stage module.
        num_devices: Number of devices the device folder's images are divided among.
        device_index: The device whose images the device partition serves.
        device_partitioner: ``iid``, ``dirichlet`` or ``by_class``.
        dirichlet_alpha: Concentration of the Dirichlet partitioner (smaller: more skew).
        classes_per_device: For ``by_class``: the class indices each device holds.
        predict_folder: Folder of image files that ``predict`` runs on (recursively; converted to this
            DataModule's sample format).
        allow_unlearnable_test_classes: Go on (with a warning) when test samples hold classes that neither side
            holds, evaluating without them; refused by default.
        val_fraction: Share of each class's training samples, on each side, held out for validation.
        pipeline: ``resize`` (every image resized to ``image_size``, no augmentation) or ``timm`` (timm's pipelines:
            resize and centre crop for validation and evaluation, ``augment`` for training).
        data_config: For the ``timm`` pipeline: the timm model whose pretrained data config (interpolation, crop,
            mean/std) it follows, e.g. the device's backbone; ``null``: timm's defaults (ImageNet statistics).
        augment: For the ``timm`` pipeline: the training augmentation (``null``: the evaluation pipeline trains).
        normalize: Normalise the images (``resize``: to [-1, 1]; ``timm``: with the data config's mean/std);
            ``false`` leaves them in [0, 1], for backbones with ``normalize: true`` that normalise their own input.
        pin_memory: Page-locked batches for faster copies to a GPU (``null``: when a GPU is present).
        persistent_workers: Keep the worker processes between epochs.
    """

    def __init__(
        self,
        cloud_dir: str,
        device_dir: str,
        test_dir: str,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int | None = None,
        seed: int = 0,
        partition: DataPartition | None = None,
        num_devices: int = 1,
        device_index: int = 0,
        device_partitioner: DevicePartitioner = "iid",
        dirichlet_alpha: float = 0.5,
        classes_per_device: list[list[int]] | None = None,
        predict_folder: str | None = None,
        allow_unlearnable_test_classes: bool = False,
        val_fraction: float = 0.1,
        pipeline: Literal["resize", "timm"] = "resize",
        data_config: str | None = None,
        augment: TrainAugmentation | None = None,
        normalize: bool = True,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, partition=partition,
                         num_devices=num_devices, device_index=device_index, device_partitioner=device_partitioner,
                         dirichlet_alpha=dirichlet_alpha, classes_per_device=classes_per_device,
                         predict_folder=predict_folder, allow_unlearnable_test_classes=allow_unlearnable_test_classes,
                         val_fraction=val_fraction, pin_memory=pin_memory, persistent_workers=persistent_workers)
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        if pipeline not in ("resize", "timm"):
            raise ConfigError(f"pipeline must be 'resize' or 'timm', got {pipeline!r}")
        if pipeline == "resize" and (augment is not None or data_config is not None):
            raise ConfigError("augment and data_config belong to timm's pipeline: set pipeline: timm, or remove them")
        if pipeline == "timm" and channels != 3:
            raise ConfigError("timm's pipeline makes RGB images: set channels: 3, or pipeline: resize")
        self.data_config = timm_data_config(data_config) if pipeline == "timm" else None
        self.augment = augment
        self.normalize = normalize
        self.dirs = {"cloud": Path(cloud_dir), "device": Path(device_dir), "test": Path(test_dir)}
        for side, folder in self.dirs.items():
            if not folder.is_dir():
                raise MissingFileError(f"data folder not found: {folder} ({side}_dir): point {side}_dir at a folder "
                                        "with one sub-folder of images per class")
        self.classes = class_names(*self.dirs.values())
        if not self.classes:
            raise DataError(f"no class folders in {', '.join(str(d) for d in self.dirs.values())}: put the images "
                             "in <folder>/<class name>/, one sub-folder per class")
        empty = [folder for root in self.dirs.values() for folder in empty_class_folders(root)]
        if empty:
            raise DataError(
                f"class folder(s) without images: {', '.join(str(folder) for folder in empty)}: add images "
                f"({', '.join(IMG_EXTENSIONS)}) or remove the folder(s); a side that does not hold a class needs "
                "no folder for it"
            )
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.image_size = image_size
        self.channels = channels

    @property
    def num_classes(self) -> int:
        """Number of distinct class-folder names across the three folders."""
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        """The configured channel count."""
        return self.channels

    @property
    def class_names(self) -> list[str]:
        """The class-folder names, by global index."""
        return list(self.classes)

    def default_num_workers(self) -> int:
        """One worker per CPU core but one (decoding images is the work), at most 8."""
        return min(8, max(1, (os.cpu_count() or 2) - 1))

    @property
    def augments_training(self) -> bool:
        """Whether training images are augmented (timm's pipeline with ``augment``)."""
        return self.augment is not None

    def input_description(self) -> dict[str, Any]:
        """How an image becomes a sample: resized (and centre-cropped, timm's pipeline), scaled to [0, 1], then
        normalised per channel unless the networks normalise their own input."""
        description: dict[str, Any] = {**super().input_description(), "scale": 1 / 255}
        if self.data_config is not None:
            description["resize"] = {
                "shorter_side": resize_before_crop(self.image_size, self.data_config["crop_pct"]),
                "center_crop": self.image_size, "interpolation": self.data_config["interpolation"]}
        if self.normalize:
            mean, std = (self.data_config["mean"], self.data_config["std"]) if self.data_config is not None else \
                ([0.5] * self.channels, [0.5] * self.channels)
            description.update(mean=[float(v) for v in mean], std=[float(v) for v in std])
        return description

    def transform(self, training: bool = False) -> Callable[..., Any]:
        """The pipeline of validation, evaluation and prediction, or (``training``) that of the training images."""
        if self.data_config is not None:
            return timm_transform(self.image_size, self.data_config, self.normalize,
                                  self.augment if training else None)
        steps: list[Any] = [transforms.Resize((self.image_size, self.image_size))]
        if self.channels == 1:
            steps.append(transforms.Grayscale(num_output_channels=1))
        else:
            steps.append(transforms.Lambda(_to_rgb))
        steps.append(transforms.ToTensor())
        if self.normalize:
            steps.append(transforms.Normalize([0.5] * self.channels, [0.5] * self.channels))
        return transforms.Compose(steps)

    def predict_transform(self) -> Callable[..., Any]:
        """The folders' own transform, after the RGB conversion that ImageFolder's loader applies to every file."""
        return transforms.Compose([transforms.Lambda(_to_rgb), self.transform()])

    def prepare_split(self) -> SplitData:
        """Index the three folders with the global class map."""
        folders = {side: GlobalClassImageFolder(path, self.class_to_idx, self.transform())
                   for side, path in self.dirs.items()}
        for side, folder in folders.items():
            if len(folder) == 0:
                raise DataError(f"the {side} folder {self.dirs[side]} holds no images: put the {side}'s images in "
                                 f"{self.dirs[side]}/<class name>/, one sub-folder per class")
            folder.check_images()
        shared = shared_images((path for path, _ in folders["cloud"].samples),
                               (path for path, _ in folders["device"].samples))
        if shared:
            raise DataError(f"the cloud and device folders share {len(shared)} image(s) (the same file, a link to it "
                            f"or a copy: e.g. {shared[0][0]} and {shared[0][1]}): the cloud must never hold a sample a "
                            "device holds; give cloud_dir and device_dir images of their own")
        held = {side: tuple(sorted(set(folders[side].targets))) for side in ("cloud", "device")}
        # The same files in the same order, through the training augmentation (validation keeps the plain ones).
        augmented = {side: folders[side].with_transform(self.transform(training=True))
                     for side in ("cloud", "device")} if self.augments_training else {}
        return SplitData(
            cloud_train=folders["cloud"],
            device_train=folders["device"],
            test=folders["test"],
            test_labels=np.asarray(folders["test"].targets, dtype=np.int64),
            class_split=ClassSplit(held["cloud"], held["device"]),
            device_labels=np.asarray(folders["device"].targets, dtype=np.int64),
            cloud_labels=np.asarray(folders["cloud"].targets, dtype=np.int64),
            cloud_augmented=augmented.get("cloud"),
            device_augmented=augmented.get("device"),
        )
