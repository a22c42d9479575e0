"""FedAvg by sample counts, with the cloud's copy holding a fixed share (the paper's default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.averaging import DeviceWeighting, fusion_weights
from dcccl.federated.aggregation.rule import AggregationRule, register_rule


@register_rule
class FedAvg(AggregationRule):
    """The cloud's copy gets the share ``cloud_share`` (λ); the devices that reported share ``1 - λ`` by their
    sample counts (or uniformly). Batch-norm running statistics are averaged; ``num_batches_tracked`` is not.

    With ``class_aware_head`` the classifier's rows are fused class by class: the row of a class only devices hold
    from the device copies, weighted by their samples of that class; the row of a class only the cloud holds from the
    cloud's copy; a shared class's row like the rest of the network. The devices then send their samples per class
    up with their copy (counted in the ledger), and the co-submodel needs timm's head API.

    Args:
        cloud_share: λ, the cloud copy's share; ``null`` weights it by its sample count like a device (plain FedAvg
            over all copies).
        device_weighting: Split the devices' share by sample counts (``samples``) or equally (``uniform``).
        class_aware_head: Fuse the classifier's rows class by class (see above).
    """

    def __init__(self, cloud_share: Optional[float] = 0.5, device_weighting: DeviceWeighting = "samples",
                 class_aware_head: bool = False) -> None:
        if cloud_share is not None and not 0.0 <= cloud_share <= 1.0:
            raise ConfigError(f"aggregation cloud_share must lie in [0, 1] (or be null), got {cloud_share}")
        if device_weighting not in ("samples", "uniform"):
            raise ConfigError(f"aggregation device_weighting must be 'samples' or 'uniform', got {device_weighting!r}")
        self.cloud_share = cloud_share
        self.device_weighting = device_weighting
        self.class_aware_head = class_aware_head

    @property
    def needs_class_counts(self) -> bool:
        """Class-aware fusion needs each copy's samples per class."""
        return self.class_aware_head

    def secure_aggregation_refusal(self) -> Optional[str]:
        """FedAvg needs only the devices' weighted mean, unless it fuses the classifier class by class."""
        if self.class_aware_head:
            return "class-aware fusion needs each copy's classifier rows with its samples per class"
        if self.cloud_share is None and self.device_weighting == "uniform":
            return "cloud_share null with uniform device weighting needs the number of devices behind each copy"
        return None

    @property
    def secure_weights_by_samples(self) -> bool:
        """By sample count, unless the devices are weighted uniformly."""
        return self.device_weighting == "samples"

    def weights(self, cloud_count: int, device_counts: Sequence[int]) -> list[float]:
        """λ for the cloud's copy, ``1 - λ`` split among the devices (see :func:`fusion_weights`)."""
        return fusion_weights(cloud_count, device_counts, self.cloud_share, self.device_weighting)

    def row_weights(self, weights: Sequence[float],
                    class_counts: Optional[Sequence[Sequence[int]]]) -> Optional[list[list[float]]]:
        """With ``class_aware_head``: per class, the cloud's copy alone for its own classes, the devices by their
        samples of a class only they hold, the plain weights for a shared class."""
        if not self.class_aware_head:
            return None
        if class_counts is None or len(class_counts) != len(weights):
            raise ConfigError("class-aware fusion needs every copy's samples per class: the cloud's copy and each "
                              "device copy must record class_counts")
        rows = []
        for c in range(len(class_counts[0])):
            cloud_has = class_counts[0][c] > 0
            devices = [float(counts[c]) for counts in class_counts[1:]]
            if cloud_has and not any(devices):
                rows.append([1.0] + [0.0] * len(devices))
            elif not cloud_has and any(devices):
                rows.append([0.0] + devices)
            else:
                rows.append(list(weights))
        return rows
