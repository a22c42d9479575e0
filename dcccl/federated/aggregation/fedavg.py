"""FedAvg by sample counts, with the cloud's copy holding a fixed share (the paper's default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.averaging import DeviceWeighting, fusion_weights
from dcccl.federated.aggregation.rule import AggregationRule


class FedAvg(AggregationRule):
    """The cloud's copy gets the share ``cloud_share`` (λ); the devices that reported share ``1 - λ`` by their
    sample counts (or uniformly). Batch-norm running statistics are averaged; ``num_batches_tracked`` is not.

    Args:
        cloud_share: λ, the cloud copy's share; ``null`` weights it by its sample count like a device (plain FedAvg
            over all copies).
        device_weighting: Split the devices' share by sample counts (``samples``) or equally (``uniform``).
    """

    def __init__(self, cloud_share: Optional[float] = 0.5, device_weighting: DeviceWeighting = "samples") -> None:
        if cloud_share is not None and not 0.0 <= cloud_share <= 1.0:
            raise ConfigError(f"aggregation cloud_share must lie in [0, 1] (or be null), got {cloud_share}")
        if device_weighting not in ("samples", "uniform"):
            raise ConfigError(f"aggregation device_weighting must be 'samples' or 'uniform', got {device_weighting!r}")
        self.cloud_share = cloud_share
        self.device_weighting = device_weighting

    def weights(self, cloud_count: int, device_counts: Sequence[int]) -> list[float]:
        """λ for the cloud's copy, ``1 - λ`` split among the devices (see :func:`fusion_weights`)."""
        return fusion_weights(cloud_count, device_counts, self.cloud_share, self.device_weighting)
