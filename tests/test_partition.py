"""Tests of dcccl.federated.class_split: the cloud/device class split and the seeded index partitions."""

from __future__ import annotations

import numpy as np
import pytest

from dcccl.federated.class_split import ClassSplit, indices_of_classes, partition_by_classes, stratified_split


def _labels(counts: list[int], seed: int = 123) -> np.ndarray:
    """``counts[c]`` samples of class ``c``, in a shuffled order (so indices are not grouped by class)."""
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    return np.random.default_rng(seed).permutation(labels)


# ---------------------------------------------------------------------------------------------------------------------
# ClassSplit


def test_class_split_properties() -> None:
    split = ClassSplit(cloud_classes=(0, 1, 2), device_classes=(2, 3))
    assert split.shared_classes == (2,)
    assert split.device_only_classes == (3,)
    assert split.seen_classes == (0, 1, 2, 3)


def test_class_split_properties_are_sorted() -> None:
    split = ClassSplit(cloud_classes=(5, 1, 3), device_classes=(9, 3, 0))
    assert split.shared_classes == (3,)
    assert split.device_only_classes == (0, 9)
    assert split.seen_classes == (0, 1, 3, 5, 9)


def test_class_split_disjoint_sides() -> None:
    split = ClassSplit(cloud_classes=(0, 1, 2, 3, 4, 5, 6), device_classes=(7, 8, 9))
    assert split.shared_classes == ()
    assert split.device_only_classes == (7, 8, 9)
    assert split.seen_classes == tuple(range(10))


def test_class_split_device_subset_of_cloud_has_no_device_only_classes() -> None:
    split = ClassSplit(cloud_classes=(0, 1, 2), device_classes=(1,))
    assert split.shared_classes == (1,)
    assert split.device_only_classes == ()
    assert split.seen_classes == (0, 1, 2)


def test_class_split_validate_accepts_a_valid_split() -> None:
    ClassSplit((0, 1, 2), (2, 3)).validate(4)  # no exception: classes 0..3 all in range


@pytest.mark.parametrize(
    ("cloud", "device", "message"),
    [
        ((), (1, 2), "cloud holds no classes"),
        ((0, 1), (), "devices hold no classes"),
        ((0, 10), (1,), r"cloud_classes \[10\] are out of range: the data has classes 0..9"),
        ((0,), (-1, 3), r"device_classes \[-1\] are out of range"),
        ((0, 1, 1), (2,), r"cloud_classes lists a class twice: \[0, 1, 1\]"),
        ((0,), (2, 3, 2), r"device_classes lists a class twice"),
    ],
)
def test_class_split_validate_errors(cloud: tuple[int, ...], device: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassSplit(cloud, device).validate(10)


# ---------------------------------------------------------------------------------------------------------------------
# stratified_split


def test_stratified_split_is_disjoint_covering_and_sorted() -> None:
    labels = _labels([10, 20, 8])
    train, test = stratified_split(labels, test_fraction=0.2, seed=0)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert np.array_equal(train, np.sort(train))
    assert np.array_equal(test, np.sort(test))


def test_stratified_split_per_class_test_counts() -> None:
    labels = _labels([10, 20, 8])
    train, test = stratified_split(labels, test_fraction=0.2, seed=0)
    # round(0.2*10) = 2, round(0.2*20) = 4, round(0.2*8) = round(1.6) = 2
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 4, 2]
    # the rest is training data: 10-2 = 8, 20-4 = 16, 8-2 = 6
    assert np.bincount(labels[train], minlength=3).tolist() == [8, 16, 6]


def test_stratified_split_is_seeded() -> None:
    labels = _labels([50, 50, 50])
    train_a, test_a = stratified_split(labels, 0.3, seed=7)
    train_b, test_b = stratified_split(labels, 0.3, seed=7)
    assert np.array_equal(train_a, train_b)
    assert np.array_equal(test_a, test_b)
    _, test_c = stratified_split(labels, 0.3, seed=8)
    assert not np.array_equal(test_a, test_c)
    # another seed picks other samples but the same number per class: round(0.3*50) = 15
    assert np.bincount(labels[test_c]).tolist() == [15, 15, 15]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.2])
def test_stratified_split_rejects_fractions_outside_the_open_interval(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"test_fraction must lie in \(0, 1\)"):
        stratified_split(_labels([5, 5]), fraction, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# partition_by_classes


def test_partition_by_classes_sides_and_counts() -> None:
    labels = _labels([10, 10, 10, 10, 10])  # classes 0..4, 10 samples each
    split = ClassSplit(cloud_classes=(0, 1, 2), device_classes=(2, 3))  # 2 shared, 4 held nowhere
    sides = partition_by_classes(labels, split, seed=0, shared_device_fraction=0.3)
    cloud, device = sides["cloud"], sides["device"]
    # shared class 2: round(0.3*10) = 3 to the device, 7 to the cloud
    assert np.bincount(labels[cloud], minlength=5).tolist() == [10, 10, 7, 0, 0]
    assert np.bincount(labels[device], minlength=5).tolist() == [0, 0, 3, 10, 0]
    # cloud 10+10+7 = 27, device 3+10 = 13
    assert len(cloud) == 27 and len(device) == 13


def test_partition_by_classes_is_disjoint_sorted_and_drops_unseen_classes() -> None:
    labels = _labels([10, 10, 10, 10, 10])
    split = ClassSplit(cloud_classes=(0, 1, 2), device_classes=(2, 3))
    sides = partition_by_classes(labels, split, seed=0)
    cloud, device = sides["cloud"], sides["device"]
    assert np.intersect1d(cloud, device).size == 0
    assert np.array_equal(cloud, np.sort(cloud)) and np.array_equal(device, np.sort(device))
    # together they cover exactly the samples of the seen classes 0..3; class 4 is dropped
    union = np.sort(np.concatenate([cloud, device]))
    assert np.array_equal(union, np.flatnonzero(labels != 4))
    # default fraction 0.5: the shared class is divided 5/5
    assert np.sum(labels[cloud] == 2) == 5 and np.sum(labels[device] == 2) == 5


def test_partition_by_classes_is_seeded() -> None:
    labels = _labels([40, 40])
    split = ClassSplit(cloud_classes=(0, 1), device_classes=(1,))
    first = partition_by_classes(labels, split, seed=3)
    again = partition_by_classes(labels, split, seed=3)
    other = partition_by_classes(labels, split, seed=4)
    assert np.array_equal(first["device"], again["device"])
    assert np.array_equal(first["cloud"], again["cloud"])
    assert not np.array_equal(first["device"], other["device"])
    # class 0 is cloud-only whatever the seed; class 1 is divided 20/20 whatever the seed
    for sides in (first, other):
        assert np.bincount(labels[sides["cloud"]], minlength=2).tolist() == [40, 20]
        assert np.bincount(labels[sides["device"]], minlength=2).tolist() == [0, 20]


def test_partition_by_classes_with_no_device_side_gives_an_empty_int_array() -> None:
    labels = _labels([3, 4])
    sides = partition_by_classes(labels, ClassSplit(cloud_classes=(0, 1), device_classes=()), seed=0)
    assert np.array_equal(sides["cloud"], np.arange(7))
    assert sides["device"].size == 0
    assert sides["device"].dtype == np.int64


def test_indices_of_classes() -> None:
    labels = np.array([3, 0, 1, 3, 2, 1], dtype=np.int64)
    assert indices_of_classes(labels, (1, 3)).tolist() == [0, 2, 3, 5]
    assert indices_of_classes(labels, (4,)).tolist() == []
