"""The DataModule interface of dcccl: a cloud partition, a device partition and the union test set."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from dcccl.fleet_partition import DevicePartitioner, partition_devices
from dcccl.partition import ClassSplit, DataPartition, indices_of_classes


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
    """

    cloud_train: Dataset
    device_train: Dataset
    test: Dataset
    test_labels: np.ndarray
    class_split: ClassSplit
    device_labels: np.ndarray


class DCCCLDataModule(LightningDataModule):
    """Serves one data partition for training and the union test set for evaluation.

    Which partition a ``fit`` trains on is declared by the stage module (its ``data_partition``: the device
    stage trains on device samples only, the cloud stages on cloud samples only, only the centralized
    baseline on both pooled); ``partition`` pins it explicitly and must then agree with the module.
    Validation uses the test samples of the classes the partition holds; ``test`` uses the union test set
    (every test sample of a class held on either side).

    With a fleet (``num_devices`` > 1) the device-side training samples are divided among the devices by
    ``device_partitioner`` and the device partition serves device ``device_index``'s share only.

    Args:
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/test split, of the division of shared classes and of the fleet's partition.
        partition: Pin the training partition instead of taking it from the stage module.
        num_devices: Number of devices the device-side samples are divided among.
        device_index: The device whose samples the device partition serves (0-based).
        device_partitioner: ``iid``, ``dirichlet`` (label skew by Dirichlet(``dirichlet_alpha``)) or ``by_class``.
        dirichlet_alpha: Concentration of the Dirichlet partitioner (smaller: more skew).
        classes_per_device: For ``by_class``: the classes each device holds.
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 partition: Optional[DataPartition] = None, num_devices: int = 1, device_index: int = 0,
                 device_partitioner: DevicePartitioner = "iid", dirichlet_alpha: float = 0.5,
                 classes_per_device: Optional[list[list[int]]] = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= device_index < num_devices:
            raise ValueError(f"device_index {device_index} is not one of the {num_devices} devices")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.partition = partition
        self.num_devices = num_devices
        self.device_index = device_index
        self.device_partitioner = device_partitioner
        self.dirichlet_alpha = dirichlet_alpha
        self.classes_per_device = classes_per_device
        self._data: Optional[SplitData] = None
        self._device_parts: Optional[list[np.ndarray]] = None

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
        """The prepared split (prepared on first use)."""
        if self._data is None:
            self._data = self.prepare_split()
        return self._data

    @property
    def class_names(self) -> list[str]:
        """Names of the classes, by index."""
        return [str(index) for index in range(self.num_classes)]

    def input_description(self) -> dict[str, Any]:
        """How a model input is made: sample shape, normalisation, class names (for exported bundles)."""
        return {"shape": list(self.train_dataset("cloud")[0][0].shape), "class_names": self.class_names}

    @property
    def class_split(self) -> ClassSplit:
        """Which classes the cloud and the device hold."""
        return self.data.class_split

    def resolve_partition(self) -> DataPartition:
        """The partition to train on: pinned, or declared by the stage module attached to the trainer."""
        declared = getattr(getattr(self.trainer, "lightning_module", None), "data_partition", None)
        if self.partition is not None and declared is not None and self.partition != declared:
            raise ValueError(
                f"the data is pinned to the {self.partition} partition but the stage trains on {declared} samples"
            )
        partition = self.partition or declared
        if partition is None:
            raise ValueError("no training partition: set data partition, or use a stage module that declares one")
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

    def train_dataset(self, partition: DataPartition) -> Dataset:
        """Training samples of ``partition`` (for ``device``: this DataModule's device only)."""
        if partition == "pooled":
            return ConcatDataset([self.data.cloud_train, self.data.device_train])
        if partition == "device":
            return self.data.device_train if self.num_devices == 1 else self.device_dataset(self.device_index)
        return self.data.cloud_train

    def train_sample_count(self) -> int:
        """Number of training samples of the partition in use (the weight of its co-submodel copy)."""
        return len(self.train_dataset(self.resolve_partition()))  # type: ignore[arg-type]

    def val_dataset(self, partition: DataPartition) -> Dataset:
        """Test samples of the classes ``partition`` holds."""
        split = self.data.class_split
        held = {"cloud": split.cloud_classes, "device": split.device_classes, "pooled": split.seen_classes}
        classes = held[partition]
        return Subset(self.data.test, indices_of_classes(self.data.test_labels, classes).tolist())

    def test_dataset(self) -> Dataset:
        """The union test set: test samples of every class held on the cloud or on the device."""
        seen = self.data.class_split.seen_classes
        return Subset(self.data.test, indices_of_classes(self.data.test_labels, seen).tolist())

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("a data partition is empty: check the class split and the data folders")
        kwargs: dict[str, Any] = {"persistent_workers": True} if self.num_workers > 0 else {}
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training samples of the partition in use."""
        return self._loader(self.train_dataset(self.resolve_partition()), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Test samples of the classes the partition in use holds."""
        return self._loader(self.val_dataset(self.resolve_partition()), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The union test set; under DDP each sample is evaluated exactly once (no padding by repetition)."""
        dataset = self.test_dataset()
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return self._loader(dataset, shuffle=False)
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                               shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
