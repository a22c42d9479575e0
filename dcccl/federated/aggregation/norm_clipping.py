"""Norm clipping: every device update scaled down to a common norm before averaging (Sun et al., "Can You Really
Backdoor Federated Learning?", 2019)."""

from __future__ import annotations

from collections.abc import Sequence, Set
from typing import Optional

import torch

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.robust import RobustRule, Stacked, update_norm
from dcccl.federated.aggregation.rule import AggregationRule, StateDict, register_rule


@register_rule
class NormClipping(RobustRule):
    """Each device copy's update of the trainable parameters (the copy minus this round's device start) is scaled
    down to norm at most ``max_norm``, then the updates are averaged by sample count; buffers (batch-norm
    statistics) are averaged as they are. A scaled-up update then weighs no more than an honest one.

    Args:
        max_norm: The bound (default: the median of the round's update norms, which adapts to any network and
            learning rate).
        cloud_share: λ, the cloud copy's share; the devices' clipped mean has ``1 - λ``.
        server: A server optimiser that takes the result as its round's mean (see :class:`RobustRule`).
    """

    def __init__(self, max_norm: Optional[float] = None, cloud_share: float = 0.5,
                 server: Optional[AggregationRule] = None) -> None:
        super().__init__(cloud_share, server)
        if max_norm is not None and not max_norm > 0:
            raise ConfigError(f"aggregation max_norm must be positive, got {max_norm}")
        self.max_norm = max_norm

    @property
    def needs_device_start(self) -> bool:
        """The updates are measured from this round's device start."""
        return True

    def weights(self, cloud_count: int, device_counts: Sequence[int]) -> list[float]:
        """λ for the cloud's copy, the rest by the devices' sample counts."""
        total = sum(device_counts)
        if not device_counts or total <= 0:
            return super().weights(cloud_count, device_counts)
        return [self.cloud_share] + [(1.0 - self.cloud_share) * count / total for count in device_counts]

    def combine(self, stacked: Stacked, counts: Sequence[int], start: Optional[StateDict],
                parameters: Set[str]) -> dict[str, torch.Tensor]:
        """The sample-weighted mean of the clipped updates, applied to the start."""
        if start is None:
            raise ValueError("norm clipping needs this round's device start")
        total = sum(counts)
        device_weights = torch.tensor([count / total if total > 0 else 1.0 / len(counts) for count in counts],
                                      dtype=torch.float64)
        trained = sorted(key for key in stacked if key in parameters)
        updates = {key: stacked[key] - start[key].detach().to(torch.float64) for key in trained}
        norms = torch.tensor([update_norm({key: updates[key][i] for key in trained}) for i in range(len(counts))])
        bound = self.max_norm if self.max_norm is not None else float(norms.median())
        scales = torch.where(norms > bound, bound / norms.clamp_min(1e-300), torch.ones_like(norms)).double()
        combined = {}
        for key, values in stacked.items():
            shaped = device_weights.reshape(-1, *([1] * (values.dim() - 1)))
            if key in updates:
                clipped = updates[key] * scales.reshape(shaped.shape)
                combined[key] = start[key].detach().to(torch.float64) + (shaped * clipped).sum(dim=0)
            else:
                combined[key] = (shaped * values).sum(dim=0)
        return combined
