"""The device-side training samples divided across a fleet of K devices, each with its own small, skewed sample set.

:func:`partition_devices` splits the device partition (see :mod:`dcccl.federated.class_split`) into per-device
index sets: ``iid`` (a seeded shuffle cut into near-equal chunks), ``dirichlet`` (per-class proportions drawn from a
symmetric Dirichlet; smaller ``alpha`` gives more label skew) or ``by_class`` (each device holds the classes it
lists).
:func:`label_histogram` and :func:`partition_summary` describe the result; :mod:`dcccl.reporting.plots` draws it.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np

from dcccl.errors import DataError

DevicePartitioner = Literal["iid", "dirichlet", "by_class"]
DEVICE_PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "by_class")

# Dirichlet draws tried before the deterministic fix-up moves samples into empty devices.
DIRICHLET_MAX_DRAWS = 100


def partition_devices(labels: np.ndarray, num_devices: int, method: DevicePartitioner = "iid", seed: int = 0,
                      alpha: float = 0.5, classes_per_device: Optional[list[list[int]]] = None) -> list[np.ndarray]:
    """Divide the device-side training samples among ``num_devices`` devices.

    Every sample goes to exactly one device and every device gets at least one sample. The result depends only on
    the arguments: the same ``seed`` gives the same partition.

    Args:
        labels: Integer labels of the device-side training samples, shape ``(N,)``.
        num_devices: The number of devices ``K`` (``1 <= K <= N``).
        method: ``"iid"``: a seeded permutation cut into ``K`` chunks whose sizes differ by at most one.
            ``"dirichlet"``: for every class, proportions over the devices drawn from
            ``Dirichlet(alpha * ones(K))``; the class's shuffled samples are cut at ``round(cumsum(p) * n)``. If a
            device ends up empty the whole draw is repeated (at most :data:`DIRICHLET_MAX_DRAWS` draws in all, from
            the same random stream); if one is still empty, each empty device in turn takes the highest position of
            the currently largest device (lowest device index on ties).
            ``"by_class"``: device ``k`` holds the classes ``classes_per_device[k]``; the samples of a class listed
            by several devices are shuffled and divided among them in near-equal chunks (earlier devices get the
            extra sample).
        seed: Seed of ``np.random.default_rng``.
        alpha: Concentration of the Dirichlet (``"dirichlet"`` only); must be positive. Small values (0.1) give
            devices dominated by few classes, large values (100) approach ``"iid"``.
        classes_per_device: For ``"by_class"`` (required there, ignored otherwise): the classes of every device.
            Every class present in ``labels`` must be listed by at least one device.

    Returns:
        ``K`` sorted ``int64`` arrays of positions into ``labels``: disjoint, non-empty, together covering
        ``0 .. N-1``.

    Raises:
        ValueError: On an unknown ``method``, ``num_devices < 1`` or ``> N``, ``alpha <= 0``, non-integer or
            non-1-D ``labels``, or (``"by_class"``) a missing or wrongly sized ``classes_per_device``, a class held
            by no device, a class listed twice by one device, or a device left without samples.
    """
    if method not in DEVICE_PARTITIONERS:
        raise DataError(f"unknown device partition method {method!r}: choose one of {list(DEVICE_PARTITIONERS)}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be a 1-D array of class indices, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {labels.dtype}")
    n = len(labels)
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)):
        raise DataError(f"num_devices must be an integer, got {num_devices!r}")
    if num_devices < 1:
        raise DataError(f"num_devices must be at least 1, got {num_devices}")
    if num_devices > n:
        raise DataError(f"{n} samples cannot fill {num_devices} devices: every device needs at least one sample")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = _iid(n, int(num_devices), rng)
    elif method == "dirichlet":
        if not alpha > 0:  # also rejects NaN
            raise DataError(f"alpha must be positive, got {alpha}")
        parts = _dirichlet(labels, int(num_devices), float(alpha), rng)
    else:
        if classes_per_device is None:
            raise DataError("method 'by_class' needs classes_per_device: the list of classes of every device")
        parts = _by_class(labels, int(num_devices), classes_per_device, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _iid(n: int, num_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded permutation of ``0 .. n-1`` cut into ``num_devices`` near-equal chunks."""
    return list(np.array_split(rng.permutation(n), num_devices))


def _dirichlet_draw(class_positions: list[np.ndarray], num_devices: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """One draw: every class's shuffled positions cut among the devices by Dirichlet proportions."""
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    concentration = np.full(num_devices, alpha)
    for positions in class_positions:
        shuffled = rng.permutation(positions)
        proportions = rng.dirichlet(concentration)
        cuts = np.rint(np.cumsum(proportions) * len(shuffled)).astype(np.int64)
        cuts = np.clip(cuts, 0, len(shuffled))[:-1]  # the last cut is the end: the rest goes to the last device
        for device, chunk in enumerate(np.split(shuffled, cuts)):
            pieces[device].append(chunk)
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in pieces]


def _dirichlet(labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Dirichlet label skew; see :func:`partition_devices`."""
    class_positions = [np.flatnonzero(labels == cls) for cls in np.unique(labels)]
    parts: list[np.ndarray] = []
    for _ in range(DIRICHLET_MAX_DRAWS):
        parts = _dirichlet_draw(class_positions, num_devices, alpha, rng)
        if all(len(p) for p in parts):
            return parts
    # Still an empty device: fill each from the currently largest one (N >= K guarantees one with 2+ samples).
    parts = [np.sort(p) for p in parts]
    for device in range(num_devices):
        if len(parts[device]) == 0:
            largest = int(np.argmax([len(p) for p in parts]))
            parts[device] = parts[largest][-1:]
            parts[largest] = parts[largest][:-1]
    return parts


def _by_class(labels: np.ndarray, num_devices: int, classes_per_device: list[list[int]],
              rng: np.random.Generator) -> list[np.ndarray]:
    """Every device holds the classes it lists; shared classes are divided evenly; see :func:`partition_devices`."""
    if len(classes_per_device) != num_devices:
        raise DataError(f"classes_per_device lists {len(classes_per_device)} devices but num_devices is "
                         f"{num_devices}")
    holders: dict[int, list[int]] = {}
    for device, classes in enumerate(classes_per_device):
        listed = [int(c) for c in classes]
        if len(set(listed)) != len(listed):
            raise DataError(f"device {device} lists a class twice: {listed}")
        for cls in listed:
            holders.setdefault(cls, []).append(device)
    present = [int(c) for c in np.unique(labels)]
    unheld = [c for c in present if c not in holders]
    if unheld:
        raise DataError(f"classes {unheld} have samples but no device holds them: list each in classes_per_device")
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for cls in present:
        positions = np.flatnonzero(labels == cls)
        devices = holders[cls]
        if len(devices) > 1:
            positions = rng.permutation(positions)
        for device, chunk in zip(devices, np.array_split(positions, len(devices))):
            pieces[device].append(chunk)
    counts = {c: int(np.count_nonzero(labels == c)) for c in present}
    parts: list[np.ndarray] = []
    for device, classes in enumerate(classes_per_device):
        part = np.concatenate(pieces[device]) if pieces[device] else np.zeros(0, dtype=np.int64)
        if len(part) == 0:
            listed = [int(c) for c in classes]
            if not any(counts.get(c, 0) for c in listed):
                raise DataError(f"device {device} gets no samples: its classes {listed} have no samples in labels")
            shared = "; ".join(f"class {c}: {counts[c]} samples, {len(holders[c])} devices"
                               for c in listed if counts.get(c))
            raise DataError(f"device {device} gets no samples: its classes are shared by more devices than they "
                             f"have samples ({shared})")
        parts.append(part)
    return parts


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-device label counts.

    Args:
        labels: Integer labels, shape ``(N,)``, each in ``0 .. num_classes-1``.
        parts: Per-device positions into ``labels`` (as returned by :func:`partition_devices`).
        num_classes: The number of classes (columns).

    Returns:
        An ``int64`` array of shape ``(K, num_classes)``: entry ``[k, c]`` counts device ``k``'s samples of class
        ``c``.

    Raises:
        ValueError: If a device holds a label outside ``0 .. num_classes-1``.
    """
    labels = np.asarray(labels)
    histogram = np.zeros((len(parts), num_classes), dtype=np.int64)
    for device, part in enumerate(parts):
        device_labels = labels[np.asarray(part, dtype=np.int64)]
        if device_labels.size and (device_labels.min() < 0 or device_labels.max() >= num_classes):
            bad = sorted({int(c) for c in device_labels if not 0 <= c < num_classes})
            raise DataError(f"device {device} holds labels {bad} outside 0..{num_classes - 1}")
        histogram[device] = np.bincount(device_labels.astype(np.int64), minlength=num_classes)
    return histogram


def partition_summary(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> dict[str, Any]:
    """A JSON-ready description of a device partition.

    Args:
        labels: Integer labels, shape ``(N,)``.
        parts: Per-device positions into ``labels``.
        num_classes: The number of classes (length of every ``label_counts``).

    Returns:
        ``{"num_devices": K, "devices": [{"device": k, "samples": n_k, "label_counts": [...]}, ...]}`` with plain
        Python ints only.
    """
    histogram = label_histogram(labels, parts, num_classes)
    return {
        "num_devices": len(parts),
        "devices": [
            {"device": device, "samples": int(len(part)), "label_counts": [int(c) for c in histogram[device]]}
            for device, part in enumerate(parts)
        ],
    }
