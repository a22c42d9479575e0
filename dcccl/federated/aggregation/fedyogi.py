"""FedYogi: FedAdam whose second moment grows or shrinks additively (Reddi et al., "Adaptive Federated
Optimization", 2021), so a burst of large updates does not shrink the step for long."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dcccl.federated.aggregation.fedadam import FedAdam
from dcccl.federated.aggregation.rule import register_rule
from dcccl.federated.aggregation.server_optimizer import Tensors


def yogi_second_moment(delta: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor],
                       beta2: float) -> Tensors:
    """Yogi's ``v - (1 - beta2) * delta**2 * sign(v - delta**2)`` per parameter (``v`` starts at zero)."""
    out = {}
    for key, value in delta.items():
        squared = value.square()
        v = previous.get(key, torch.zeros_like(value))
        out[key] = v - (1 - beta2) * squared * torch.sign(v - squared)
    return out


@register_rule
class FedYogi(FedAdam):
    """:class:`FedAdam` with Yogi's second moment; the same settings."""

    def second_moment(self, delta: Tensors, previous: Mapping[str, torch.Tensor]) -> Tensors:
        """Yogi's additive update of the second moment."""
        return yogi_second_moment(delta, previous, self.beta2)
