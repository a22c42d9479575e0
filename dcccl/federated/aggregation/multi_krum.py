"""Multi-Krum: the mean of the device copies Krum scores best (El Mhamdi et al., 2018)."""

from __future__ import annotations

from typing import Optional

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.krum import Krum
from dcccl.federated.aggregation.robust import Stacked
from dcccl.federated.aggregation.rule import AggregationRule, register_rule


@register_rule
class MultiKrum(Krum):
    """The devices' aggregate is the mean of the ``keep`` copies with the lowest Krum scores (default ``n - f``:
    every copy but as many as there are assumed attackers).

    Args:
        byzantine: ``f``, the attackers assumed among a round's copies.
        keep: How many copies are averaged (default ``n - f``, at least one).
        cloud_share: λ, the cloud copy's share; the devices' mean has ``1 - λ``.
        server: A server optimiser that takes the result as its round's mean (see :class:`RobustRule`).
    """

    def __init__(self, byzantine: int = 2, keep: Optional[int] = None, cloud_share: float = 0.5,
                 server: Optional[AggregationRule] = None) -> None:
        super().__init__(byzantine, cloud_share, server)
        if keep is not None and keep < 1:
            raise ConfigError(f"aggregation keep must be at least 1, got {keep}")
        self.keep = keep

    def chosen(self, stacked: Stacked) -> list[int]:
        """The ``keep`` copies with the lowest scores."""
        scores = self.scores(stacked)
        keep = self.keep if self.keep is not None else max(1, len(scores) - self.byzantine)
        return sorted(int(i) for i in scores.argsort()[:min(keep, len(scores))])
