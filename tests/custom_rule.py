"""An aggregation rule as a user writes one: a subclass overriding one hook (``tests.custom_rule.EqualShares``)."""

from __future__ import annotations

from collections.abc import Sequence

from dcccl.federated.aggregation import AggregationRule


class EqualShares(AggregationRule):
    """Every copy, the cloud's included, weighs the same."""

    def weights(self, cloud_count: int, device_counts: Sequence[int]) -> list[float]:
        """One share per copy."""
        return [1.0 / (1 + len(device_counts))] * (1 + len(device_counts))
