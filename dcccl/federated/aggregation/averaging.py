"""The arithmetic of fusion, as pure functions: weighted averages of state dicts, fusion weights, re-based updates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Literal, Optional

import torch

from dcccl.errors import ConfigError

DeviceWeighting = Literal["samples", "uniform"]


class RunningAverage:
    """Weighted average of state dicts that holds one running sum, not every state dict.

    Floating-point entries (weights, batch-norm running mean and variance) are averaged with the given
    weights. Integer entries such as batch-norm ``num_batches_tracked`` are counters, not statistics:
    they are taken from the first state dict added.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._first: dict[str, torch.Tensor] = {}
        self._total_weight = 0.0

    def add(self, state_dict: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add one state dict with a non-negative ``weight``."""
        if weight < 0:
            raise ValueError(f"aggregation weights must be non-negative, got {weight}")
        if self._first and set(state_dict) != set(self._first):
            diff = sorted(set(state_dict) ^ set(self._first))
            raise ValueError(f"state dicts to average have different keys: {diff[:5]}")
        for key, value in state_dict.items():
            if key not in self._first:
                self._first[key] = value.detach().clone()
            if value.is_floating_point():
                contribution = value.detach().to(torch.float64) * weight
                self._sum[key] = self._sum[key] + contribution if key in self._sum else contribution
        self._total_weight += weight

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted average, with each entry in its original dtype."""
        if not self._first:
            raise ValueError("nothing to average")
        if self._total_weight <= 0:
            raise ValueError("aggregation weights sum to zero")
        return {
            key: (self._sum[key] / self._total_weight).to(first.dtype) if key in self._sum else first.clone()
            for key, first in self._first.items()
        }


def weighted_average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Average ``state_dicts`` with ``weights`` (normalised to sum to one); see :class:`RunningAverage`."""
    if len(state_dicts) != len(weights):
        raise ValueError(f"{len(state_dicts)} state dicts but {len(weights)} weights")
    running = RunningAverage()
    for state_dict, weight in zip(state_dicts, weights):
        running.add(state_dict, weight)
    return running.result()


def fusion_weights(
    cloud_count: int,
    device_counts: Sequence[int],
    cloud_share: Optional[float] = 0.5,
    device_weighting: DeviceWeighting = "samples",
) -> list[float]:
    """Weights of the cloud's co-submodel copy (first) and the devices' copies (in order), summing to one.

    Args:
        cloud_count: Samples behind the cloud's copy.
        device_counts: Samples behind each device's copy.
        cloud_share: The cloud copy's share λ; the devices share ``1 - λ``. ``None`` weights the cloud copy
            by its sample count like a device (plain FedAvg over all copies).
        device_weighting: Split the devices' share by sample counts or uniformly.
    """
    if device_weighting not in ("samples", "uniform"):
        raise ConfigError(f"device_weighting must be 'samples' or 'uniform', got {device_weighting!r}")
    if not device_counts:
        return [1.0]
    counts = [float(c) for c in device_counts]
    if any(c < 0 for c in counts) or cloud_count < 0:
        raise ValueError("sample counts must be non-negative")
    if cloud_share is None:
        total = cloud_count + sum(counts)
        if total <= 0:
            raise ValueError("sample counts sum to zero")
        return [cloud_count / total] + [c / total for c in counts]
    if not 0.0 <= cloud_share <= 1.0:
        raise ConfigError(f"cloud_share must lie in [0, 1], got {cloud_share}")
    if device_weighting == "uniform":
        shares = [1.0 / len(counts)] * len(counts)
    else:
        total_devices = sum(counts)
        if total_devices <= 0:
            raise ValueError("device sample counts sum to zero")
        shares = [c / total_devices for c in counts]
    return [cloud_share] + [(1.0 - cloud_share) * s for s in shares]


def rebase_update(copy: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                  onto: Mapping[str, torch.Tensor], parameters: Set[str]) -> dict[str, torch.Tensor]:
    """A stale device update applied to today's model: ``onto + (copy - base)`` for the ``parameters``.

    Buffers (batch-norm statistics, counters) keep the copy's own values: a difference of variances is no
    variance, and re-applying it could make one negative.
    """
    return {key: onto[key] + (value - base[key]) if key in parameters else value.clone()
            for key, value in copy.items()}
