"""Latest-update averaging: every device that ever reported keeps its weight while it is offline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from dcccl.federated.aggregation.fedavg import FedAvg
from dcccl.federated.aggregation.rule import register_rule

if TYPE_CHECKING:
    from dcccl.federated.fleet import FleetSpec


@register_rule
class LatestUpdate(FedAvg):
    """FedAvg over every device's most recent copy (in the spirit of FedLaAvg), not only this round's.

    An offline device's last copy contributes its update (the copy minus the model it started from) re-applied to
    this round's model, so every device's data keeps its weight while the fleet's availability varies.

    Args:
        cloud_share: λ, the cloud copy's share; ``null`` weights it by its sample count like a device.
        device_weighting: Split the devices' share by sample counts (``samples``) or equally (``uniform``).
    """

    def secure_aggregation_refusal(self) -> Optional[str]:
        """Offline devices' last updates are re-applied one by one: they must be in the clear."""
        return ("latest-update averaging needs each device's last update in the clear (it re-applies the copies of "
                "offline devices one by one)")

    def fused_copies(self, fleet: FleetSpec, seed: int, round_index: int) -> list[tuple[int, int]]:
        """Every device that has reported so far, with the last round it reported in."""
        return latest_copies(fleet, seed, round_index)


def latest_copies(fleet: FleetSpec, seed: int, round_index: int) -> list[tuple[int, int]]:
    """``(device, round)`` of every device that has reported up to ``round_index``, with the last round it did."""
    latest: dict[int, int] = {}
    for r in range(1, round_index + 1):
        for device in fleet.reporting(seed, r):
            latest[device] = r
    return sorted(latest.items())
