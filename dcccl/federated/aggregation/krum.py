"""Krum: the device copy closest to its neighbours (Blanchard et al., "Machine Learning with Adversaries", 2017)."""

from __future__ import annotations

from collections.abc import Sequence, Set
from typing import Optional

import torch

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.robust import RobustRule, Stacked, krum_scores
from dcccl.federated.aggregation.rule import AggregationRule, StateDict, register_rule


@register_rule
class Krum(RobustRule):
    """The devices' aggregate is the copy whose ``n - f - 2`` nearest other copies are closest to it (squared
    distance over every float entry), ``f`` the number of attackers it is built to withstand.

    Args:
        byzantine: ``f``, the attackers assumed among a round's copies.
        cloud_share: λ, the cloud copy's share; the chosen copy has ``1 - λ``.
        server: A server optimiser that takes the result as its round's mean (see :class:`RobustRule`).
    """

    def __init__(self, byzantine: int = 2, cloud_share: float = 0.5, server: Optional[AggregationRule] = None) -> None:
        super().__init__(cloud_share, server)
        if byzantine < 0:
            raise ConfigError(f"aggregation byzantine must be at least 0, got {byzantine}")
        self.byzantine = byzantine

    def chosen(self, stacked: Stacked) -> list[int]:
        """The copies the aggregate averages: here the one with the lowest Krum score."""
        return [int(self.scores(stacked).argmin())]

    def scores(self, stacked: Stacked) -> torch.Tensor:
        """Every copy's Krum score."""
        flat = torch.cat([values.reshape(values.shape[0], -1) for _, values in sorted(stacked.items())], dim=1)
        return krum_scores(flat, self.byzantine)

    def combine(self, stacked: Stacked, counts: Sequence[int], start: Optional[StateDict],
                parameters: Set[str]) -> dict[str, torch.Tensor]:
        """The mean of the chosen copies."""
        chosen = torch.tensor(self.chosen(stacked))
        return {key: values[chosen].mean(dim=0) for key, values in stacked.items()}
