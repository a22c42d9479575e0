"""FedAvgM: server momentum on the round's fused update (Hsu et al., "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", 2019)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.averaging import DeviceWeighting
from dcccl.federated.aggregation.rule import ServerState, register_rule
from dcccl.federated.aggregation.server_optimizer import ServerOptimizer, Tensors


def momentum_buffer(delta: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor],
                    momentum: float) -> Tensors:
    """``momentum * previous + delta`` per parameter (``previous`` empty: ``delta``)."""
    return {key: momentum * previous[key] + value if key in previous else value.clone()
            for key, value in delta.items()}


@register_rule
class FedAvgM(ServerOptimizer):
    """The co-submodel moves by ``server_lr * v`` with ``v = momentum * v + (mean - start)`` each round.

    With ``server_lr: 1`` and ``momentum: 0`` it is :class:`FedAvg` exactly.

    Args:
        server_lr: The server's learning rate.
        momentum: The server momentum β.
        latest_updates: Fuse every device's most recent copy, not only this round's (as :class:`LatestUpdate`).
        cloud_share: λ, the cloud copy's share in the mean; ``null`` weights it by its sample count like a device.
        device_weighting: Split the devices' share by sample counts (``samples``) or equally (``uniform``).
        class_aware_head: Fuse the classifier's rows class by class (see :class:`FedAvg`).
    """

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, latest_updates: bool = False,
                 cloud_share: Optional[float] = 0.5, device_weighting: DeviceWeighting = "samples",
                 class_aware_head: bool = False) -> None:
        super().__init__(server_lr, latest_updates, cloud_share, device_weighting, class_aware_head)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"aggregation momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum

    def update(self, delta: Tensors, state: ServerState, round_index: int) -> tuple[Tensors, ServerState]:
        """``server_lr`` times the momentum buffer, which is kept."""
        buffer = momentum_buffer(delta, state.get("momentum", {}), self.momentum)
        return {key: self.server_lr * value for key, value in buffer.items()}, {"momentum": buffer}
