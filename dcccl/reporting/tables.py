"""Human-readable summaries of a run's metrics."""

from __future__ import annotations

from typing import Any

_COLUMNS = (
    ("acc", "all classes"),
    ("acc_cloud_classes", "cloud classes"),
    ("acc_device_classes", "device-only classes"),
)
_MODELS = (("served", "served model f + h"), ("cloud_only", "cloud submodel f alone"))


def results_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of test accuracy (percent) of the served model and the cloud submodel alone."""
    header = f"{'model':<26}" + "".join(f"{title:>22}" for _, title in _COLUMNS)
    lines = [header, "-" * len(header)]
    for prefix, title in _MODELS:
        cells = []
        for key, _ in _COLUMNS:
            value = metrics.get(f"{prefix}/{key}")
            cells.append(f"{100 * value:>21.1f}%" if isinstance(value, (int, float)) else f"{'n/a':>22}")
        lines.append(f"{title:<26}" + "".join(cells))
    per_round = metrics.get("served/acc_per_round")
    if per_round:
        lines.append("served accuracy per round: " + ", ".join(f"{100 * acc:.1f}%" for acc in per_round))
    if "transfers/downlink_bytes" in metrics:
        lines.append(f"device/cloud transfers: {metrics['transfers/downlink_bytes']:,} bytes down, "
                     f"{metrics['transfers/uplink_bytes']:,} bytes up (transfers.json)")
    return "\n".join(lines)
