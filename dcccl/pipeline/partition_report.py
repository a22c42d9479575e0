"""The fleet's data partition as a person reads it: per-device sample and label counts, and their plot."""

from __future__ import annotations

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.fleet import FleetSpec
from dcccl.federated.partitioners import label_histogram, partition_summary
from dcccl.pipeline.preflight import DataDescription
from dcccl.reporting.plots import plot_label_histogram


def write_partition_report(run: RunDirectory, data: DataDescription, fleet: FleetSpec) -> None:
    """``fleet/partition.json`` (per-device label counts) and ``fleet/partition.png`` (stacked bars)."""
    atomic_write_json(run.fleet_partition, partition_summary(data.device_labels, data.device_parts, data.num_classes))
    plot_label_histogram(label_histogram(data.device_labels, data.device_parts, data.num_classes),
                         run.fleet_partition.with_suffix(".png"),
                         title=f"Device label distribution ({fleet.partitioner}, {fleet.num_devices} devices)")
