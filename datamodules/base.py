"""The DataModule interface of dcccl: a cloud partition, a device partition and the union test set."""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision import transforms

from datamodules.sampling import EpochSeededSampler
from dcccl.errors import DataError, MissingFileError
from dcccl.federated.class_split import (
    ClassSplit,
    DataPartition,
    indices_of_classes,
    stratified_split,
    unlearnable_classes,
)
from dcccl.federated.partitioners import DevicePartitioner, partition_devices
from dcccl.pipeline.preflight import DataDescription

# Offset of the held-out validation's random stream from the data's seed.
VALIDATION_SEED_OFFSET = 7_919
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class SplitData:
    """What a concrete DataModule prepares; the base class turns it into dataloaders.

    Args:
        cloud_train: Training samples held on the cloud.
        device_train: Training samples held on the devices (all of them, before division into the fleet).
        test: All test samples (cloud-side and device-side), before restriction to the seen classes.
        test_labels: Label of every sample of ``test``.
        class_split: Which classes each side holds.
        device_labels: Label of every sample of ``device_train`` (to divide them among devices).
        cloud_labels: Label of every sample of ``cloud_train``.
        cloud_val: Validation samples held out of the cloud's (set by the base class).
        device_val: Validation samples held out of the devices' (set by the base class; only the pooled,
            privacy-violating baseline validates on them).
        cloud_augmented: The samples of ``cloud_train``, in its order, with the training augmentation: what the
            stages train on, when given (validation and evaluation keep the plain samples).
        device_augmented: Likewise for ``device_train``.
    """

    cloud_train: Dataset
    device_train: Dataset
    test: Dataset
    test_labels: np.ndarray
    class_split: ClassSplit
    device_labels: np.ndarray
    cloud_labels: np.ndarray
    cloud_val: Optional[Dataset] = None
    device_val: Optional[Dataset] = None
    cloud_augmented: Optional[Dataset] = None
    device_augmented: Optional[Dataset] = None


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, by extension in any case), sorted by relative path.

    Hidden files and folders (names starting with ``.``) are skipped.

    Raises:
        MissingFileError: ``folder`` is not a folder.
        DataError: ``folder`` holds no image file.
    """
    if not folder.is_dir():
        raise MissingFileError(f"predict folder not found: {folder}")
    files = sorted((path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
                    and not any(part.startswith(".") for part in path.relative_to(folder).parts)),
                   key=lambda path: path.relative_to(folder).as_posix())
    if not files:
        raise DataError(f"no images in {folder} (looked recursively for {', '.join(IMAGE_EXTENSIONS)} files)")
    return files


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


class ImageFiles(Dataset):
    """Image files as model inputs: item ``i`` is ``(sample, path of file i relative to root)``.

    Args:
        root: The folder the paths are reported relative to.
        files: The image files, in order.
        transform: Turns a loaded image into a sample.
    """

    def __init__(self, root: Path, files: list[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.root = root
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.files[index]
        try:
            with Image.open(path) as opened:
                opened.load()  # decode now: a truncated file fails here, naming the file
                image = opened.copy()
        except (OSError, SyntaxError, ValueError) as err:  # how PIL reports unidentified, truncated or broken files
            raise DataError(f"cannot read image {path}: {err}") from err
        return self.transform(image), path.relative_to(self.root).as_posix()


class IndexedDataset(Dataset):
    """Item ``i`` of ``dataset`` with its position: ``(sample, label, i)``.

    Args:
        dataset: The dataset (items ``(sample, label)``).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        sample, label = self.dataset[index]
        return sample, label, index


class DCCCLDataModule(LightningDataModule):
    """Serves one data partition for training and the union test set for evaluation.

    Which partition a ``fit`` trains on is declared by the stage module (its ``data_partition``: the device
    stage trains on device samples only, the cloud stages on cloud samples only, only the centralized
    baseline on both pooled); ``partition`` pins it explicitly and must then agree with the module.
    ``val_fraction`` of each side's training samples (per class, seeded) is held out for validation, which the
    stages' training budgets watch: the cloud stages validate on the cloud's held-out samples, the pooled baseline on
    both sides'; a device stage does not validate (its share is small, and no other device's samples are its own).
    ``test`` uses the union test set (every test sample of a class held on either side); no stage trains or stops
    on it.

    With a fleet (``num_devices`` > 1) the device-side training samples are divided among the devices by
    ``device_partitioner`` and the device partition serves device ``device_index``'s share only.

    Args:
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (``null``: :meth:`default_num_workers`, which suits the data).
        seed: Seed of the train/test split, of the division of shared classes and of the fleet's partition.
        partition: Pin the training partition instead of taking it from the stage module.
        num_devices: Number of devices the device-side samples are divided among.
        device_index: The device whose samples the device partition serves (0-based).
        device_partitioner: ``iid``, ``dirichlet`` (label skew by Dirichlet(``dirichlet_alpha``)) or ``by_class``.
        dirichlet_alpha: Concentration of the Dirichlet partitioner (smaller: more skew).
        classes_per_device: For ``by_class``: the classes each device holds.
        predict_folder: Folder of image files that ``predict`` runs on (recursively; converted to the format of
            this DataModule's own samples by :meth:`predict_transform`).
        allow_unlearnable_test_classes: Go on (with a warning) when the test samples hold classes that neither the
            cloud nor the devices hold, evaluating without them; by default such data is refused, since no model
            of the method can learn those classes.
        val_fraction: Share of each class's training samples, on each side, held out for validation.
        pin_memory: Page-locked batches for faster copies to a GPU (``null``: when a GPU is present).
        persistent_workers: Keep the worker processes between epochs (with ``num_workers`` > 0).
    """

    def __init__(self, batch_size: int = 64, num_workers: Optional[int] = None, seed: int = 0,
                 partition: Optional[DataPartition] = None, num_devices: int = 1, device_index: int = 0,
                 device_partitioner: DevicePartitioner = "iid", dirichlet_alpha: float = 0.5,
                 classes_per_device: Optional[list[list[int]]] = None, predict_folder: Optional[str] = None,
                 allow_unlearnable_test_classes: bool = False, val_fraction: float = 0.1,
                 pin_memory: Optional[bool] = None, persistent_workers: bool = True) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise DataError(f"num_workers must be 0 or more, got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if not 0 <= device_index < num_devices:
            raise DataError(f"device_index {device_index} is not one of the {num_devices} devices")
        self.batch_size = batch_size
        self.num_workers = self.default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.partition = partition
        self.num_devices = num_devices
        self.device_index = device_index
        self.device_partitioner = device_partitioner
        self.dirichlet_alpha = dirichlet_alpha
        self.classes_per_device = classes_per_device
        self.predict_folder = predict_folder
        self.allow_unlearnable_test_classes = allow_unlearnable_test_classes
        self.val_fraction = val_fraction
        self._data: Optional[SplitData] = None
        self._device_parts: Optional[list[np.ndarray]] = None

    def default_num_workers(self) -> int:
        """Worker processes when ``num_workers`` is not given: none (samples already in memory need no workers)."""
        return 0

    @property
    def augments_training(self) -> bool:
        """Whether the training samples are drawn afresh each time (random augmentation)."""
        return False

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of classes (known without loading the samples; linked to every stage module)."""

    @property
    @abstractmethod
    def in_chans(self) -> int:
        """Input channels of the images (linked to every stage module)."""

    @abstractmethod
    def prepare_split(self) -> SplitData:
        """Load the samples and divide them into cloud, device and test."""

    @property
    def data(self) -> SplitData:
        """The prepared split, validation held out (prepared on first use)."""
        if self._data is None:
            data = self.prepare_split()
            self.check_test_classes(data)
            self._data = self.hold_out_validation(data)
        return self._data

    def hold_out_validation(self, data: SplitData) -> SplitData:
        """``data`` with ``val_fraction`` of each side's training samples, class by class, held out for validation."""
        # What trains: the augmented samples when there are any; what validates: always the plain ones.
        training = {"cloud": data.cloud_train if data.cloud_augmented is None else data.cloud_augmented,
                    "device": data.device_train if data.device_augmented is None else data.device_augmented}
        if self.val_fraction == 0.0:
            return replace(data, cloud_train=training["cloud"], device_train=training["device"],
                           cloud_val=Subset(data.cloud_train, []), device_val=Subset(data.device_train, []))
        sides = {}
        for side, samples, labels in (("cloud", data.cloud_train, data.cloud_labels),
                                      ("device", data.device_train, data.device_labels)):
            # Its own random stream: the held-out samples do not depend on how the test samples were drawn.
            fit, val = stratified_split(labels, self.val_fraction, self.seed + VALIDATION_SEED_OFFSET)
            sides[side] = (Subset(training[side], fit.tolist()), labels[fit], Subset(samples, val.tolist()))
        return replace(data, cloud_train=sides["cloud"][0], cloud_labels=sides["cloud"][1], cloud_val=sides["cloud"][2],
                       device_train=sides["device"][0], device_labels=sides["device"][1],
                       device_val=sides["device"][2])

    def check_test_classes(self, data: SplitData) -> None:
        """Refuse test samples of classes that neither side holds (or warn, if ``allow_unlearnable_test_classes``)."""
        unheld = unlearnable_classes(data.class_split, data.test_labels)
        if not unheld:
            return
        names = ", ".join(self.class_names[c] if 0 <= c < len(self.class_names) else str(c) for c in unheld)
        problem = f"the test samples hold classes that neither the cloud nor any device holds ({names}): nothing can " \
                  "learn them"
        if not self.allow_unlearnable_test_classes:
            raise DataError(f"{problem}; add training samples of them, remove them from the test data, or set data "
                             "allow_unlearnable_test_classes (--data.init_args.allow_unlearnable_test_classes=true) "
                             "to evaluate without them")
        warnings.warn(f"{problem}. They are left out of every evaluation (allow_unlearnable_test_classes is set).",
                      UserWarning, stacklevel=2)

    @property
    def class_names(self) -> list[str]:
        """Names of the classes, by index."""
        return [str(index) for index in range(self.num_classes)]

    def describe(self) -> DataDescription:
        """What the pipeline's checks and reports need to know of the data (prepares the split, which checks it)."""
        return DataDescription(self.num_classes, self.in_chans, tuple(self.train_dataset("cloud")[0][0].shape),
                               self.data.device_labels, self.device_parts)

    def input_description(self) -> dict[str, Any]:
        """How a model input is made: sample shape, normalisation, class names (for exported bundles)."""
        return {"shape": list(self.train_dataset("cloud")[0][0].shape), "class_names": self.class_names}

    def predict_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """How a loaded image file becomes a sample in the format of this DataModule's own samples.

        The default follows :meth:`input_description`: the image is converted to RGB, resized to the samples'
        height and width, reduced to ``in_chans`` channels (1: grey-scale, 3: RGB), scaled to [0, 1] and
        normalised with the described ``mean`` and ``std`` when there are any. Override it for other formats.
        """
        if self.in_chans not in (1, 3):
            raise DataError(f"image files are read as 1 or 3 channels, the data has {self.in_chans}: "
                             "override predict_transform")
        description = self.input_description()
        height, width = description["shape"][-2:]
        steps: list[Any] = [transforms.Lambda(_to_rgb), transforms.Resize((height, width))]
        steps.append(transforms.Grayscale(num_output_channels=1) if self.in_chans == 1 else transforms.Lambda(_to_rgb))
        steps.append(transforms.ToTensor())
        if "mean" in description:
            steps.append(transforms.Normalize(description["mean"], description["std"]))
        return transforms.Compose(steps)

    @property
    def class_split(self) -> ClassSplit:
        """Which classes the cloud and the device hold."""
        return self.data.class_split

    def resolve_partition(self) -> DataPartition:
        """The partition to train on: pinned, or declared by the stage module attached to the trainer."""
        module = getattr(self.trainer, "lightning_module", None)
        declared = getattr(module, "data_partition", None)  # the instance's: a subclass may change it anywhere
        if self.partition is not None and declared is not None and self.partition != declared:
            raise DataError(
                f"the data is pinned to the {self.partition} partition but the stage module "
                f"({type(module).__name__}) trains on {declared} samples: a stage module must train on the samples "
                "its stage is given; do not change its data_partition"
            )
        partition = self.partition or declared
        if partition is None:
            raise DataError("no training partition: set data partition, or use a stage module that declares one")
        return partition

    @property
    def device_parts(self) -> list[np.ndarray]:
        """Positions in the device-side training samples of each device's share (one part without a fleet)."""
        if self._device_parts is None:
            labels = self.data.device_labels
            self._device_parts = partition_devices(
                labels, self.num_devices, self.device_partitioner, self.seed, self.dirichlet_alpha,
                self.classes_per_device,
            ) if self.num_devices > 1 else [np.arange(len(labels))]
        return self._device_parts

    def device_dataset(self, device_index: int) -> Dataset:
        """Training samples of one device."""
        return Subset(self.data.device_train, self.device_parts[device_index].tolist())

    def device_class_counts(self, device_index: int) -> list[int]:
        """Training samples of one device per class."""
        labels = self.data.device_labels[self.device_parts[device_index]]
        return np.bincount(labels, minlength=self.num_classes).tolist()

    def device_loader(self, device_index: int) -> DataLoader:
        """One device's training samples, shuffled as a device stage of its own would see them (seeded per epoch:
        call ``loader.sampler.set_epoch(e)``)."""
        return self._loader(self.device_dataset(device_index), shuffle=True)

    def train_dataset(self, partition: DataPartition) -> Dataset:
        """Training samples of ``partition`` (for ``device``: this DataModule's device only)."""
        if partition == "pooled":
            return ConcatDataset([self.data.cloud_train, self.data.device_train])
        if partition == "device":
            return self.data.device_train if self.num_devices == 1 else self.device_dataset(self.device_index)
        return self.data.cloud_train

    def train_class_counts(self) -> list[int]:
        """Training samples per class of the partition in use."""
        partition = self.resolve_partition()
        if partition == "device":
            return self.device_class_counts(self.device_index)
        labels = self.data.cloud_labels if partition == "cloud" else \
            np.concatenate([self.data.cloud_labels, self.data.device_labels])
        return np.bincount(labels, minlength=self.num_classes).tolist()

    def train_sample_count(self) -> int:
        """Number of training samples of the partition in use (the weight of its co-submodel copy)."""
        return len(self.train_dataset(self.resolve_partition()))  # type: ignore[arg-type]

    def val_dataset(self, partition: DataPartition) -> Optional[Dataset]:
        """The held-out validation samples a stage training on ``partition`` watches (none for a device stage)."""
        if partition == "device":
            return None
        if partition == "pooled":
            return ConcatDataset([self.data.cloud_val, self.data.device_val])  # type: ignore[list-item]
        return self.data.cloud_val

    def side_test_dataset(self, side: DataPartition) -> Dataset:
        """Test samples of the classes ``side`` holds (``pooled``: of every class held anywhere)."""
        split = self.data.class_split
        held = {"cloud": split.cloud_classes, "device": split.device_classes, "pooled": split.seen_classes}
        return Subset(self.data.test, indices_of_classes(self.data.test_labels, held[side]).tolist())

    def test_dataset(self) -> Dataset:
        """The union test set: test samples of every class held on the cloud or on the device."""
        seen = self.data.class_split.seen_classes
        return Subset(self.data.test, indices_of_classes(self.data.test_labels, seen).tolist())

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise DataError("a data partition is empty: check the class split and the data folders")
        # Seeded per epoch: a stage resumed from its last checkpoint sees the order an uninterrupted run saw.
        sampler = EpochSeededSampler(dataset, self.seed) if shuffle else None  # type: ignore[arg-type]
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            options["persistent_workers"] = self.persistent_workers
        return options

    def partition_loader(self, partition: DataPartition) -> DataLoader:
        """Shuffled training samples of ``partition``, as a stage training on it gets them (without a trainer)."""
        return self._loader(self.train_dataset(partition), shuffle=True)

    def sequential_loader(self, dataset: Dataset) -> DataLoader:
        """``dataset`` in order, every sample on every process (to compute something once per sample)."""
        return self._loader(dataset, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training samples of the partition in use; ``(sample, label, index)`` when the stage module asks
        for the samples' positions (``wants_sample_indices``, e.g. to look up what it computed once per sample).

        A stage module that trains many devices in one ``fit`` (``round_devices``: a list of device indices) gets
        those indices instead, one per step, padded with ``-1`` to a multiple of the number of processes: under DDP
        each process then takes different devices, and every process the same number of steps.
        """
        module = getattr(self.trainer, "lightning_module", None)
        devices = getattr(module, "round_devices", None)
        if devices is not None:
            world_size = getattr(self.trainer, "world_size", 1)
            padded = list(devices) + [-1] * (-len(devices) % world_size)
            return DataLoader(padded, batch_size=None, shuffle=False)  # type: ignore[arg-type]
        dataset = self.train_dataset(self.resolve_partition())
        if getattr(getattr(self.trainer, "lightning_module", None), "wants_sample_indices", False):
            dataset = IndexedDataset(dataset)
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> Any:
        """The held-out validation samples of the partition in use (no loader: nothing to validate on)."""
        dataset = self.val_dataset(self.resolve_partition())
        if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
            return []
        return self._loader(dataset, shuffle=False)

    def predict_dataset(self) -> ImageFiles:
        """Every image file under ``predict_folder`` as ``(sample, path relative to the folder)``."""
        if self.predict_folder is None:
            raise DataError("no folder to predict on: set data predict_folder (--data.init_args.predict_folder DIR)")
        root = Path(self.predict_folder)
        return ImageFiles(root, image_files(root), self.predict_transform())

    def predict_dataloader(self) -> DataLoader:
        """The image files under ``predict_folder``, in order; under DDP each file is predicted exactly once."""
        return self._evaluation_loader(self.predict_dataset())

    def test_dataloader(self) -> DataLoader:
        """The union test set; under DDP each sample is evaluated exactly once (no padding by repetition)."""
        return self._evaluation_loader(self.test_dataset())

    def _evaluation_loader(self, dataset: Dataset) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return self._loader(dataset, shuffle=False)
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                               shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **self._loader_options())
