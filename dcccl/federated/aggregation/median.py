"""The coordinate-wise median of the device copies (Yin et al., "Byzantine-Robust Distributed Learning", 2018)."""

from __future__ import annotations

from collections.abc import Sequence, Set
from typing import Optional

import torch

from dcccl.federated.aggregation.robust import RobustRule, Stacked, coordinate_median
from dcccl.federated.aggregation.rule import StateDict, register_rule


@register_rule
class Median(RobustRule):
    """Each coordinate of the devices' aggregate is the median of the copies' values there (sample counts ignored):
    fewer than half of the copies cannot move it outside the range of the honest ones.

    Args:
        cloud_share: λ, the cloud copy's share; the devices' median has ``1 - λ``.
        server: A server optimiser that takes the result as its round's mean (see :class:`RobustRule`).
    """

    def combine(self, stacked: Stacked, counts: Sequence[int], start: Optional[StateDict],
                parameters: Set[str]) -> dict[str, torch.Tensor]:
        """The coordinate-wise median of every float entry."""
        return {key: coordinate_median(values) for key, values in stacked.items()}
