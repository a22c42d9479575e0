"""FedAdam: Adam on the server, over the rounds' fused updates (Reddi et al., "Adaptive Federated Optimization",
2021)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.averaging import DeviceWeighting
from dcccl.federated.aggregation.rule import ServerState, register_rule
from dcccl.federated.aggregation.server_optimizer import ServerOptimizer, Tensors


def first_moment(delta: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor], beta1: float) -> Tensors:
    """``beta1 * m + (1 - beta1) * delta`` per parameter (``m`` starts at zero)."""
    return {key: beta1 * previous.get(key, torch.zeros_like(value)) + (1 - beta1) * value
            for key, value in delta.items()}


def adam_second_moment(delta: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor],
                       beta2: float) -> Tensors:
    """Adam's ``beta2 * v + (1 - beta2) * delta**2`` per parameter (``v`` starts at zero)."""
    return {key: beta2 * previous.get(key, torch.zeros_like(value)) + (1 - beta2) * value.square()
            for key, value in delta.items()}


def adaptive_step(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], lr: float,
                  tau: float) -> Tensors:
    """``lr * m / (sqrt(v) + tau)`` per parameter."""
    return {key: lr * value / (second[key].sqrt() + tau) for key, value in first.items()}


@register_rule
class FedAdam(ServerOptimizer):
    """The co-submodel moves by ``lr_t * m / (sqrt(v) + tau)``, where ``m`` and ``v`` are Adam's moments of the
    rounds' pseudo-gradients ``mean - start``. Every coordinate moves by about ``server_lr`` in the direction the
    copies agree on, however small their update was.

    With ``bias_correction`` (as Kingma and Ba, and Flower's FedAdam) ``lr_t = server_lr * sqrt(1 - beta2**t) /
    (1 - beta1**t)`` in round ``t``; without it, ``lr_t = server_lr`` (the paper's algorithm).

    Args:
        server_lr: The server's learning rate.
        beta1: Decay of the first moment.
        beta2: Decay of the second moment.
        tau: Adaptivity: added to ``sqrt(v)``, it bounds the step where the copies barely move a coordinate.
        bias_correction: Scale the learning rate for the moments' start at zero.
        latest_updates: Fuse every device's most recent copy, not only this round's (as :class:`LatestUpdate`).
        cloud_share: λ, the cloud copy's share in the mean; ``null`` weights it by its sample count like a device.
        device_weighting: Split the devices' share by sample counts (``samples``) or equally (``uniform``).
        class_aware_head: Fuse the classifier's rows class by class (see :class:`FedAvg`).
    """

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 bias_correction: bool = True, latest_updates: bool = False, cloud_share: Optional[float] = 0.5,
                 device_weighting: DeviceWeighting = "samples", class_aware_head: bool = False) -> None:
        super().__init__(server_lr, latest_updates, cloud_share, device_weighting, class_aware_head)
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"aggregation {name} must lie in [0, 1), got {beta}")
        if not tau > 0:
            raise ConfigError(f"aggregation tau must be positive, got {tau}")
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.bias_correction = bias_correction

    def second_moment(self, delta: Tensors, previous: Mapping[str, torch.Tensor]) -> Tensors:
        """The second moment after this round (Adam's exponential average of ``delta**2``)."""
        return adam_second_moment(delta, previous, self.beta2)

    def update(self, delta: Tensors, state: ServerState, round_index: int) -> tuple[Tensors, ServerState]:
        """The adaptive step; both moments are kept."""
        first = first_moment(delta, state.get("first_moment", {}), self.beta1)
        second = self.second_moment(delta, state.get("second_moment", {}))
        lr = self.server_lr
        if self.bias_correction:
            lr *= math.sqrt(1 - self.beta2 ** round_index) / (1 - self.beta1 ** round_index)
        return adaptive_step(first, second, lr, self.tau), {"first_moment": first, "second_moment": second}
