"""Which samples live where: the class split between cloud and devices, and seeded index partitions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from dcccl.errors import DataError

Partition = Literal["cloud", "device"]
# What a stage may train on: one side's samples, or (the privacy-violating centralized upper bound) both pooled.
DataPartition = Literal["cloud", "device", "pooled"]


@dataclass(frozen=True)
class ClassSplit:
    """The classes whose training samples the cloud holds and those the devices hold.

    A class may be on both sides; its samples are then divided between them.

    Args:
        cloud_classes: Class indices with training samples on the cloud.
        device_classes: Class indices with training samples on the devices.
    """

    cloud_classes: tuple[int, ...]
    device_classes: tuple[int, ...]

    @property
    def shared_classes(self) -> tuple[int, ...]:
        """Classes held on both sides."""
        return tuple(sorted(set(self.cloud_classes) & set(self.device_classes)))

    @property
    def device_only_classes(self) -> tuple[int, ...]:
        """Classes seen only on devices: what the cloud model cannot learn alone."""
        return tuple(sorted(set(self.device_classes) - set(self.cloud_classes)))

    @property
    def seen_classes(self) -> tuple[int, ...]:
        """Classes held anywhere; the union test set covers exactly these."""
        return tuple(sorted(set(self.cloud_classes) | set(self.device_classes)))

    def validate(self, num_classes: int) -> None:
        """Raise ``ValueError`` with a clear message if the split does not fit ``num_classes`` classes."""
        if not self.cloud_classes and not self.device_classes:
            raise DataError("neither the cloud nor the devices hold any class: cloud_classes and device_classes are "
                             f"empty; list class indices (0..{num_classes - 1}) in both")
        if not self.cloud_classes:
            raise DataError("the cloud holds no classes: cloud_classes is empty; list the class indices whose "
                             "training samples the cloud holds")
        if not self.device_classes:
            raise DataError("the devices hold no classes: device_classes is empty; list the class indices whose "
                             "training samples the devices hold (DC-CCL needs device samples to learn from)")
        for side, classes in (("cloud", self.cloud_classes), ("device", self.device_classes)):
            bad = [c for c in classes if not 0 <= c < num_classes]
            if bad:
                raise DataError(f"{side}_classes {bad} are out of range: the data has classes 0..{num_classes - 1}; "
                                 f"fix {side}_classes in the data config")
            if len(set(classes)) != len(classes):
                raise DataError(f"{side}_classes lists a class twice: {list(classes)}")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into train and test, class by class, with a seeded shuffle.

    Returns sorted index arrays; each class contributes ``round(test_fraction * n_class)`` test samples.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def partition_by_classes(
    labels: np.ndarray, split: ClassSplit, seed: int, shared_device_fraction: float = 0.5
) -> dict[Partition, np.ndarray]:
    """Divide training sample indices between cloud and device by class.

    Samples of a class held on one side all go there; samples of a shared class are shuffled (seeded)
    and ``shared_device_fraction`` of them go to the device. Samples of classes held nowhere are dropped.
    The two index sets are disjoint and sorted.
    """
    rng = np.random.default_rng(seed)
    cloud, device = [], []
    shared = set(split.shared_classes)
    for cls in split.seen_classes:
        idx = np.flatnonzero(labels == cls)
        if cls in shared:
            idx = rng.permutation(idx)
            n_device = int(round(shared_device_fraction * len(idx)))
            device.append(idx[:n_device])
            cloud.append(idx[n_device:])
        elif cls in split.device_classes:
            device.append(idx)
        else:
            cloud.append(idx)
    empty = np.zeros(0, dtype=np.int64)
    return {
        "cloud": np.sort(np.concatenate(cloud)) if cloud else empty,
        "device": np.sort(np.concatenate(device)) if device else empty,
    }


def unlearnable_classes(split: ClassSplit, test_labels: np.ndarray) -> tuple[int, ...]:
    """Classes with test samples that neither the cloud nor the devices hold: no model of the method can learn them."""
    return tuple(sorted(set(np.unique(test_labels).tolist()) - set(split.seen_classes)))


def indices_of_classes(labels: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Sorted indices of the samples whose label is in ``classes``."""
    return np.flatnonzero(np.isin(labels, np.asarray(classes, dtype=labels.dtype)))
