"""The DataModule interface of dcccl: a cloud partition, a device partition and the union test set."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from dcccl.partition import ClassSplit, DataPartition, indices_of_classes


@dataclass
class SplitData:
    """What a concrete DataModule prepares; the base class turns it into dataloaders.

    Args:
        cloud_train: Training samples held on the cloud.
        device_train: Training samples held on the device.
        test: All test samples (cloud-side and device-side), before restriction to the seen classes.
        test_labels: Label of every sample of ``test``.
        class_split: Which classes each side holds.
    """

    cloud_train: Dataset
    device_train: Dataset
    test: Dataset
    test_labels: np.ndarray
    class_split: ClassSplit


class DCCCLDataModule(LightningDataModule):
    """Serves one data partition for training and the union test set for evaluation.

    Which partition a ``fit`` trains on is declared by the stage module (its ``data_partition``: the device
    stage trains on device samples only, the cloud stages on cloud samples only, only the centralized
    baseline on both pooled); ``partition`` pins it explicitly and must then agree with the module.
    Validation uses the test samples of the classes the partition holds; ``test`` uses the union test set
    (every test sample of a class held on either side).

    Args:
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/test split and of the division of shared classes.
        partition: Pin the training partition instead of taking it from the stage module.
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 partition: Optional[DataPartition] = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.partition = partition
        self._data: Optional[SplitData] = None

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

    def train_dataset(self, partition: DataPartition) -> Dataset:
        """Training samples of ``partition``."""
        if partition == "pooled":
            return ConcatDataset([self.data.cloud_train, self.data.device_train])
        return self.data.cloud_train if partition == "cloud" else self.data.device_train

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
        """The union test set."""
        return self._loader(self.test_dataset(), shuffle=False)
