"""Plots of the device fleet: how the device-side samples and their labels are spread over the devices."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dcccl.artifacts.atomic import atomic_write_bytes

# Devices with an x tick label at most; the rest of the ticks are dropped at a round step.
MAX_DEVICE_TICKS = 20


def _class_colors(num_classes: int) -> list[Any]:
    """One colour per class from a qualitative colormap; class ``c`` keeps its colour whatever else is drawn."""
    from matplotlib import colormaps

    if num_classes <= 10:
        palette = list(colormaps["tab10"].colors)  # type: ignore[attr-defined]
    else:
        palette = [color for name in ("tab20", "tab20b", "tab20c") for color in colormaps[name].colors]  # type: ignore[attr-defined]
    return [palette[c % len(palette)] for c in range(num_classes)]


def _tick_step(num_devices: int) -> int:
    """The smallest round step (1, 2, 5, 10, 20, 50, ...) that labels at most :data:`MAX_DEVICE_TICKS` devices."""
    step, magnitude = 1, 1
    while math.ceil(num_devices / step) > MAX_DEVICE_TICKS:
        for factor in (2, 5, 10):
            step = factor * magnitude
            if math.ceil(num_devices / step) <= MAX_DEVICE_TICKS:
                break
        magnitude *= 10
    return step


def plot_label_histogram(histogram: np.ndarray, path: Path, class_names: Optional[list[str]] = None,
                         title: str = "Device label distribution") -> Path:
    """Draw a per-device label histogram as a stacked bar chart and write it as a PNG.

    One bar per device (x: device index), stacked by class (a qualitative colormap; class ``c`` always gets the same
    colour), height = samples. Classes no device holds are left out of the bars and the legend; the legend sits
    right of the axes so it never covers a bar. Bars thin out and tick labels are thinned to a round step for large
    fleets (readable up to about 100 devices).

    Args:
        histogram: ``(K, num_classes)`` sample counts, as returned by
            :func:`dcccl.federated.partitioners.label_histogram`.
        path: Where to write the PNG (parent folders are created; the write is atomic).
        class_names: Legend names of the classes, one per column; class indices when ``None``.
        title: The figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: If ``histogram`` is not 2-D with at least one device and class, has negative counts, or
            ``class_names`` does not name every column.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(histogram)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
        raise ValueError(f"histogram must have shape (num_devices, num_classes) with both >= 1, got {counts.shape}")
    if (counts < 0).any():
        raise ValueError("histogram holds negative counts")
    num_devices, num_classes = counts.shape
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but the histogram has {num_classes} classes")
    names = [str(n) for n in class_names] if class_names is not None else [f"class {c}" for c in range(num_classes)]
    colors = _class_colors(num_classes)
    held = [c for c in range(num_classes) if counts[:, c].sum() > 0]

    width_in = min(16.0, max(6.5, 3.0 + 0.11 * num_devices))
    fig, ax = plt.subplots(figsize=(width_in, 4.5))
    xs = np.arange(num_devices)
    bar_width = 0.8 if num_devices <= 30 else 0.9
    edge = {"edgecolor": "white", "linewidth": 0.5} if num_devices <= 30 else {"linewidth": 0}
    bottom = np.zeros(num_devices)
    for c in held:  # lowest class at the bottom of every bar
        ax.bar(xs, counts[:, c], bar_width, bottom=bottom, color=colors[c], label=names[c], **edge)
        bottom += counts[:, c]

    step = _tick_step(num_devices)
    ax.set_xticks(xs[::step])
    ax.set_xlim(-0.6, num_devices - 0.4)
    ax.set_xlabel(f"device ({num_devices} devices, {int(counts.sum())} samples)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.05)
    if held:
        handles, labels = ax.get_legend_handles_labels()
        columns = max(1, math.ceil(len(held) / 24))
        if columns == 1:  # one column: top entry = top of the stack
            handles, labels = handles[::-1], labels[::-1]
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=columns,
                  frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_accuracy_per_round(history: list[dict[str, Any]], path: Path) -> Path:
    """Served accuracy after every round: overall, on cloud classes and on device-only classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rounds = [entry["round"] for entry in history]
    for key, label in (("served/acc", "all classes"), ("served/acc_cloud_classes", "cloud classes"),
                       ("served/acc_device_classes", "device-only classes")):
        if all(key in entry for entry in history):
            ax.plot(rounds, [100 * entry[key] for entry in history], marker="o", label=label)
    cloud_only = history[-1].get("cloud_only/acc")
    if cloud_only is not None:
        ax.axhline(100 * cloud_only, linestyle=":", color="grey", label="cloud submodel alone, all classes")
    ax.set_xlabel("round")
    ax.set_ylabel("served accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(rounds)
    ax.set_title("Served model after every round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# Above this many classes the confusion matrix is drawn at a fixed size: no counts in the cells, every n-th class named.
MAX_ANNOTATED_CLASSES = 30


def plot_confusion_matrix(matrix: list[list[int]], path: Path, class_names: Optional[list[str]] = None,
                          title: str = "Served model on the union test set") -> Path:
    """Confusion matrix (rows: true class, columns: predicted class), counts written in the cells.

    With more than :data:`MAX_ANNOTATED_CLASSES` classes the figure keeps a readable fixed size (a cell per class
    would make a 1,000-class matrix an image of tens of thousands of pixels a side): the counts are colours on a
    logarithmic scale and about 20 classes along each axis are named.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    counts = np.asarray(matrix)
    names = class_names or [str(i) for i in range(len(counts))]
    large = len(counts) > MAX_ANNOTATED_CLASSES
    size = (11.0, 10.0) if large else (1.0 + 0.55 * len(counts), 0.8 + 0.5 * len(counts))
    fig, ax = plt.subplots(figsize=size)
    if large:
        masked = np.ma.masked_equal(counts, 0)
        image = ax.imshow(masked, cmap="Blues", interpolation="nearest",
                          norm=LogNorm(vmin=1, vmax=max(int(counts.max()), 2)))
        step = max(1, math.ceil(len(names) / 20))
        ticks = list(range(0, len(names), step))
        ax.set_xticks(ticks, labels=[names[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, labels=[names[i] for i in ticks], fontsize=7)
        title = f"{title} ({len(names)} classes, counts by colour)"
    else:
        image = ax.imshow(counts, cmap="Blues")
        ax.set_xticks(range(len(names)), labels=names)
        ax.set_yticks(range(len(names)), labels=names)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if not large:
        threshold = counts.max() / 2 if counts.size else 0
        for (row, col), value in np.ndenumerate(counts):
            if value:
                ax.text(col, row, str(value), ha="center", va="center", fontsize=7,
                        color="white" if value > threshold else "black")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_membership_roc(curves: dict[int, tuple[list[float], list[float]]], aucs: dict[int, float], path: Path,
                        title: str = "Membership inference on the uploaded copies") -> Path:
    """ROC curves of the loss-threshold attack, one per device copy (at most ten labelled), with the chance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance (AUC 0.50)")
    for position, (device, (fpr, tpr)) in enumerate(sorted(curves.items())):
        label = f"device {device} (AUC {aucs[device]:.3f})" if position < 10 else None
        ax.plot(fpr, tpr, linewidth=1.2, alpha=0.8, label=label)
    ax.set_xlabel("false positive rate (held-out samples called members)")
    ax.set_ylabel("true positive rate (training samples called members)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)
