"""Data sets that fit in memory as labelled image arrays: split train/test per class, then classes cloud/device."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

from datamodules.base import DCCCLDataModule, SplitData
from dcccl.federated.class_split import ClassSplit, DataPartition, partition_by_classes, stratified_split
from dcccl.federated.partitioners import DevicePartitioner


class ArrayDataModule(DCCCLDataModule):
    """Labelled images held in memory (a subclass loads them): split into train/test per class, classes split
    cloud/device.

    Args:
        cloud_classes: Classes whose training samples the cloud holds.
        device_classes: Classes whose training samples the device holds (a class may be on both sides;
            its samples are then divided, ``shared_device_fraction`` of them going to the device).
        test_fraction: Share of every class's samples held out for testing.
        shared_device_fraction: Share of a shared class's training samples that the device holds.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/test split, of the division of shared classes and of the fleet's partition.
        partition: Pin the training partition instead of taking it from the stage module.
        num_devices: Number of devices the device-side samples are divided among.
        device_index: The device whose samples the device partition serves.
        device_partitioner: ``iid``, ``dirichlet`` or ``by_class``.
        dirichlet_alpha: Concentration of the Dirichlet partitioner (smaller: more skew).
        classes_per_device: For ``by_class``: the classes each device holds.
        predict_folder: Folder of image files that ``predict`` runs on (recursively; converted to this
            DataModule's sample format).
        allow_unlearnable_test_classes: Go on (with a warning) when test samples hold classes that neither side
            holds, evaluating without them; refused by default.
        val_fraction: Share of each class's training samples, on each side, held out for validation.
        pin_memory: Page-locked batches for faster copies to a GPU (``null``: when a GPU is present).
    """

    def __init__(
        self,
        cloud_classes: list[int] = [0, 1, 2, 3, 4, 5, 6],  # noqa: B006 - shown by --help, never mutated
        device_classes: list[int] = [7, 8, 9],  # noqa: B006
        test_fraction: float = 0.2,
        shared_device_fraction: float = 0.5,
        batch_size: int = 64,
        num_workers: int = 0,
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
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, partition=partition,
                         num_devices=num_devices, device_index=device_index, device_partitioner=device_partitioner,
                         dirichlet_alpha=dirichlet_alpha, classes_per_device=classes_per_device,
                         predict_folder=predict_folder, allow_unlearnable_test_classes=allow_unlearnable_test_classes,
                         val_fraction=val_fraction, pin_memory=pin_memory)
        self.split_spec = ClassSplit(tuple(cloud_classes), tuple(device_classes))
        self.split_spec.validate(self.num_classes)
        self.test_fraction = test_fraction
        self.shared_device_fraction = shared_device_fraction

    @abstractmethod
    def load(self) -> tuple[torch.Tensor, np.ndarray]:
        """Every image as a normalised ``(N, C, H, W)`` float tensor, and its integer label."""

    def prepare_split(self) -> SplitData:
        """Seeded stratified train/test split, then the training samples divided by class."""
        images, labels = self.load()
        dataset = TensorDataset(images, torch.as_tensor(labels))
        train_idx, test_idx = stratified_split(labels, self.test_fraction, self.seed)
        sides = partition_by_classes(labels[train_idx], self.split_spec, self.seed, self.shared_device_fraction)
        return SplitData(
            cloud_train=Subset(dataset, train_idx[sides["cloud"]].tolist()),
            device_train=Subset(dataset, train_idx[sides["device"]].tolist()),
            test=Subset(dataset, test_idx.tolist()),
            test_labels=labels[test_idx],
            class_split=self.split_spec,
            device_labels=labels[train_idx[sides["device"]]],
            cloud_labels=labels[train_idx[sides["cloud"]]],
        )
