"""The coordinate-wise trimmed mean of the device copies (Yin et al., 2018)."""

from __future__ import annotations

from collections.abc import Sequence, Set
from typing import Optional

import torch

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.robust import RobustRule, Stacked, trimmed_mean
from dcccl.federated.aggregation.rule import AggregationRule, StateDict, register_rule


@register_rule
class TrimmedMean(RobustRule):
    """Per coordinate, the largest and the smallest ``int(trim * n)`` of the ``n`` copies' values are cut and the rest
    averaged (sample counts ignored).

    Args:
        trim: The share cut off each end, in [0, 0.5) (Flower's FedTrimmedAvg's default, 0.2).
        cloud_share: λ, the cloud copy's share; the devices' trimmed mean has ``1 - λ``.
        server: A server optimiser that takes the result as its round's mean (see :class:`RobustRule`).
    """

    def __init__(self, trim: float = 0.2, cloud_share: float = 0.5, server: Optional[AggregationRule] = None) -> None:
        super().__init__(cloud_share, server)
        if not 0.0 <= trim < 0.5:
            raise ConfigError(f"aggregation trim must lie in [0, 0.5), got {trim}")
        self.trim = trim

    def combine(self, stacked: Stacked, counts: Sequence[int], start: Optional[StateDict],
                parameters: Set[str]) -> dict[str, torch.Tensor]:
        """The coordinate-wise trimmed mean of every float entry."""
        return {key: trimmed_mean(values, self.trim) for key, values in stacked.items()}
