"""Tests of dcccl.federated.partitioners (the device samples divided across a fleet) and dcccl.plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dcccl.federated.partitioners import label_histogram, partition_devices, partition_summary
from dcccl.reporting.plots import plot_label_histogram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _labels(counts: dict[int, int], seed: int = 123) -> np.ndarray:
    """``counts[c]`` samples of class ``c``, in a shuffled order (so positions are not grouped by class)."""
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in counts.items()])
    return np.random.default_rng(seed).permutation(labels)


LABELS = _labels({7: 150, 8: 90, 9: 60})
# Every method with arguments under which the seed matters (by_class: classes 8 and 9 are shared).
METHODS: dict[str, dict[str, Any]] = {
    "iid": {},
    "dirichlet": {"alpha": 0.5},
    "by_class": {"classes_per_device": [[7], [7, 8], [8, 9], [9]]},
}


def _assert_valid(parts: list[np.ndarray], n: int, num_devices: int) -> None:
    """Disjoint, covering ``0 .. n-1``, non-empty, sorted int64 arrays, one per device."""
    assert len(parts) == num_devices
    for part in parts:
        assert part.dtype == np.int64
        assert len(part) > 0
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert len(joined) == n  # disjoint (with the next line)
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _mean_entropy(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean over devices of the entropy (nats) of the device's label distribution."""
    histogram = label_histogram(labels, parts, num_classes).astype(float)
    p = histogram / histogram.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return float(terms.sum(axis=1).mean())


# ---------------------------------------------------------------------------------------------------------------------
# Properties every method has


@pytest.mark.parametrize("method", list(METHODS))
def test_partition_is_disjoint_covering_non_empty(method: str) -> None:
    num_devices = 4
    parts = partition_devices(LABELS, num_devices, method, seed=3, **METHODS[method])  # type: ignore[arg-type]
    _assert_valid(parts, len(LABELS), num_devices)


@pytest.mark.parametrize("method", list(METHODS))
def test_partition_is_deterministic_per_seed(method: str) -> None:
    first = partition_devices(LABELS, 4, method, seed=7, **METHODS[method])  # type: ignore[arg-type]
    again = partition_devices(LABELS, 4, method, seed=7, **METHODS[method])  # type: ignore[arg-type]
    other = partition_devices(LABELS, 4, method, seed=8, **METHODS[method])  # type: ignore[arg-type]
    assert _same(first, again)
    assert not _same(first, other)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_devices", [1, 2, 13, 100])
def test_partition_valid_for_many_fleet_sizes(method: str, num_devices: int) -> None:
    parts = partition_devices(LABELS, num_devices, method, seed=0)  # type: ignore[arg-type]
    _assert_valid(parts, len(LABELS), num_devices)


def test_one_device_holds_everything() -> None:
    for method, kwargs in (("iid", {}), ("dirichlet", {}), ("by_class", {"classes_per_device": [[7, 8, 9]]})):
        parts = partition_devices(LABELS, 1, method, **kwargs)  # type: ignore[arg-type]
        np.testing.assert_array_equal(parts[0], np.arange(len(LABELS)))


def test_labels_as_list_are_accepted() -> None:
    parts = partition_devices([0, 1, 0, 1], 2)  # type: ignore[arg-type]
    _assert_valid(parts, 4, 2)


# ---------------------------------------------------------------------------------------------------------------------
# iid


def test_iid_sizes_by_hand() -> None:
    parts = partition_devices(np.zeros(10, dtype=np.int64), 3, "iid", seed=0)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    _assert_valid(parts, 10, 3)


@pytest.mark.parametrize(("n", "num_devices"), [(10, 10), (11, 10), (300, 7), (1000, 100)])
def test_iid_sizes_differ_by_at_most_one(n: int, num_devices: int) -> None:
    sizes = [len(p) for p in partition_devices(np.zeros(n, dtype=np.int64), num_devices, "iid", seed=1)]
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1


def test_iid_ignores_labels() -> None:
    """The same N and seed give the same partition whatever the labels."""
    a = partition_devices(np.zeros(50, dtype=np.int64), 5, "iid", seed=2)
    b = partition_devices(np.arange(50), 5, "iid", seed=2)
    assert _same(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# dirichlet


def test_dirichlet_smaller_alpha_means_more_skew() -> None:
    labels = _labels({c: 300 for c in range(10)}, seed=5)
    for seed in range(3):
        skewed = _mean_entropy(labels, partition_devices(labels, 20, "dirichlet", seed=seed, alpha=0.1), 10)
        uniform = _mean_entropy(labels, partition_devices(labels, 20, "dirichlet", seed=seed, alpha=100.0), 10)
        assert skewed < uniform - 0.5
        assert uniform > 0.95 * np.log(10)  # alpha=100 is close to iid


def test_dirichlet_sizes_are_unequal() -> None:
    sizes = [len(p) for p in partition_devices(LABELS, 10, "dirichlet", seed=0, alpha=0.3)]
    assert max(sizes) > 2 * min(sizes)


def test_dirichlet_fix_up_fills_empty_devices() -> None:
    """One sample per device with a tiny alpha: redraws cannot help, the fix-up must fill every device."""
    labels = _labels({0: 6, 1: 6}, seed=0)
    parts = partition_devices(labels, 12, "dirichlet", seed=0, alpha=1e-3)
    _assert_valid(parts, 12, 12)
    assert all(len(p) == 1 for p in parts)
    assert _same(parts, partition_devices(labels, 12, "dirichlet", seed=0, alpha=1e-3))


def test_dirichlet_fix_up_with_more_samples_than_devices() -> None:
    labels = _labels({0: 20, 1: 20}, seed=0)
    parts = partition_devices(labels, 15, "dirichlet", seed=4, alpha=1e-3)
    _assert_valid(parts, 40, 15)


# ---------------------------------------------------------------------------------------------------------------------
# by_class


def test_by_class_assignment_by_hand() -> None:
    labels = np.array([7, 7, 8, 8, 9, 9, 9, 9])
    parts = partition_devices(labels, 3, "by_class", seed=0, classes_per_device=[[7], [8, 9], [9]])
    _assert_valid(parts, 8, 3)
    np.testing.assert_array_equal(parts[0], [0, 1])
    assert set(parts[1].tolist()) >= {2, 3}
    nines_1 = set(parts[1].tolist()) - {2, 3}
    nines_2 = set(parts[2].tolist())
    assert len(nines_1) == len(nines_2) == 2
    assert nines_1 | nines_2 == {4, 5, 6, 7}


def test_by_class_shared_class_split_evenly() -> None:
    labels = _labels({0: 10, 1: 7})
    parts = partition_devices(labels, 3, "by_class", seed=1, classes_per_device=[[0, 1], [1], [1]])
    histogram = label_histogram(labels, parts, 2)
    np.testing.assert_array_equal(histogram[:, 0], [10, 0, 0])
    np.testing.assert_array_equal(histogram[:, 1], [3, 2, 2])  # near-equal, earlier devices take the extra


def test_by_class_unshared_classes_ignore_seed() -> None:
    cpd = [[7], [8], [9]]
    assert _same(partition_devices(LABELS, 3, "by_class", seed=0, classes_per_device=cpd),
                 partition_devices(LABELS, 3, "by_class", seed=99, classes_per_device=cpd))


def test_by_class_listed_class_without_samples_is_fine_if_device_has_others() -> None:
    parts = partition_devices(LABELS, 2, "by_class", classes_per_device=[[7, 3], [8, 9]])
    _assert_valid(parts, len(LABELS), 2)


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("num_devices", [0, -2])
def test_error_too_few_devices(num_devices: int) -> None:
    with pytest.raises(ValueError, match="num_devices must be at least 1"):
        partition_devices(LABELS, num_devices)


def test_error_more_devices_than_samples() -> None:
    with pytest.raises(ValueError, match="5 samples cannot fill 6 devices"):
        partition_devices(np.zeros(5, dtype=np.int64), 6)
    with pytest.raises(ValueError, match="0 samples cannot fill 1 devices"):
        partition_devices(np.zeros(0, dtype=np.int64), 1)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_error_alpha_not_positive(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must be positive"):
        partition_devices(LABELS, 3, "dirichlet", alpha=alpha)


def test_error_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown device partition method 'shards'"):
        partition_devices(LABELS, 3, "shards")  # type: ignore[arg-type]


def test_error_bad_labels() -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition_devices(np.zeros((4, 2), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="must be integers"):
        partition_devices(np.zeros(4), 2)


def test_error_by_class_missing_classes_per_device() -> None:
    with pytest.raises(ValueError, match="needs classes_per_device"):
        partition_devices(LABELS, 3, "by_class")


def test_error_by_class_wrong_number_of_devices() -> None:
    with pytest.raises(ValueError, match="lists 2 devices but num_devices is 3"):
        partition_devices(LABELS, 3, "by_class", classes_per_device=[[7, 8], [9]])


def test_error_by_class_class_held_by_no_device() -> None:
    with pytest.raises(ValueError, match=r"classes \[9\] have samples but no device holds them"):
        partition_devices(LABELS, 2, "by_class", classes_per_device=[[7], [8]])


def test_error_by_class_device_without_samples() -> None:
    with pytest.raises(ValueError, match=r"device 2 gets no samples: its classes \[3, 4\] have no samples"):
        partition_devices(LABELS, 3, "by_class", classes_per_device=[[7, 8], [9], [3, 4]])
    with pytest.raises(ValueError, match="device 1 gets no samples"):
        partition_devices(LABELS, 2, "by_class", classes_per_device=[[7, 8, 9], []])


def test_error_by_class_shared_class_too_small() -> None:
    labels = np.array([0, 0, 0, 1])
    pattern = r"device 2 gets no samples: its classes are shared .*\(class 1: 1 samples, 3 devices\)"
    with pytest.raises(ValueError, match=pattern):
        partition_devices(labels, 4, "by_class", classes_per_device=[[0], [1], [1], [1]])


def test_error_by_class_duplicate_class() -> None:
    with pytest.raises(ValueError, match="device 0 lists a class twice"):
        partition_devices(LABELS, 2, "by_class", classes_per_device=[[7, 7], [8, 9]])


# ---------------------------------------------------------------------------------------------------------------------
# label_histogram and partition_summary


def test_label_histogram_by_hand() -> None:
    labels = np.array([0, 2, 2, 1, 0, 2])
    parts = [np.array([0, 1, 2]), np.array([3]), np.array([4, 5])]
    histogram = label_histogram(labels, parts, 4)
    assert histogram.dtype == np.int64
    np.testing.assert_array_equal(histogram, [[1, 0, 2, 0], [0, 1, 0, 0], [1, 0, 1, 0]])


def test_label_histogram_rows_sum_to_device_sizes() -> None:
    parts = partition_devices(LABELS, 6, "dirichlet", seed=2)
    histogram = label_histogram(LABELS, parts, 10)
    assert histogram.shape == (6, 10)
    np.testing.assert_array_equal(histogram.sum(axis=1), [len(p) for p in parts])
    np.testing.assert_array_equal(histogram.sum(axis=0)[7:], [150, 90, 60])
    assert histogram[:, :7].sum() == 0


def test_label_histogram_label_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"device 0 holds labels \[5\] outside 0..4"):
        label_histogram(np.array([1, 5]), [np.array([0, 1])], 5)


def test_partition_summary_structure() -> None:
    labels = np.array([0, 2, 2, 1, 0, 2])
    parts = [np.array([0, 1, 2]), np.array([3]), np.array([4, 5])]
    summary = partition_summary(labels, parts, 3)
    assert summary == {
        "num_devices": 3,
        "devices": [
            {"device": 0, "samples": 3, "label_counts": [1, 0, 2]},
            {"device": 1, "samples": 1, "label_counts": [0, 1, 0]},
            {"device": 2, "samples": 2, "label_counts": [1, 0, 1]},
        ],
    }
    assert json.loads(json.dumps(summary)) == summary  # plain Python types only
    assert all(type(d["samples"]) is int and all(type(c) is int for c in d["label_counts"])
               for d in summary["devices"])


# ---------------------------------------------------------------------------------------------------------------------
# plot_label_histogram


@pytest.mark.parametrize("num_devices", [5, 100])
def test_plot_label_histogram_writes_png(tmp_path: Path, num_devices: int) -> None:
    labels = _labels({7: 400, 8: 400, 9: 400})
    histogram = label_histogram(labels, partition_devices(labels, num_devices, "dirichlet", alpha=0.5), 10)
    path = tmp_path / "nested" / "dir" / f"fleet_{num_devices}.png"
    returned = plot_label_histogram(histogram, path)
    assert returned == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind


def test_plot_label_histogram_with_class_names(tmp_path: Path) -> None:
    names = [f"digit {c}" for c in range(3)]
    path = plot_label_histogram(np.array([[1, 2, 0], [0, 0, 3]]), tmp_path / "named.png", class_names=names,
                                title="Named")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_label_histogram_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        plot_label_histogram(np.array([1, 2, 3]), tmp_path / "a.png")
    with pytest.raises(ValueError, match="class_names has 2 names but the histogram has 3 classes"):
        plot_label_histogram(np.ones((2, 3), dtype=np.int64), tmp_path / "b.png", class_names=["a", "b"])
    with pytest.raises(ValueError, match="negative"):
        plot_label_histogram(-np.ones((2, 3), dtype=np.int64), tmp_path / "c.png")
    assert not list(tmp_path.iterdir())
