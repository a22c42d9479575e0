"""Secure aggregation of the device copies (SecAgg+ on Flower): the cloud learns only their weighted mean.

Each device sends its update (its copy minus the co-submodel it started from, floating-point tensors only) masked
by Flower's SecAgg+ protocol, weighted by its sample count (or by one, for uniform device weighting); the masks
cancel in the sum, so the cloud recovers the weighted mean update and nothing about any one device. The protocol
quantises each weighted update to ``quantization_range`` levels over ``[-clipping_range, clipping_range]``, so the
mean it recovers differs from the exact one by at most about ``devices * clipping_range / quantization_range``
divided by the devices' total weight over ``max_weight`` (:func:`quantization_tolerance`).

An aggregation rule allows it only when its fusion needs nothing but that weighted mean: latest-update averaging
needs each device's last update in the clear, class-aware fusion each copy's rows with its class counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from dcccl.errors import ConfigError

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+ for the device copies of every round (Flower runs only).

    Args:
        num_shares: The share of a round's devices each device's secret is split among (1.0: all of them).
        reconstruction_threshold: The share of those shares needed to reconstruct a secret (a dropped device's
            mask); higher is safer, lower tolerates more dropouts.
        clipping_range: Each weighted update entry is clipped to ``[-clipping_range, clipping_range]``.
        quantization_range: Levels of the quantisation of that range.
        max_weight: The largest weight (samples of one device) the protocol expects; a device's weight is divided
            by it before quantising, so keep it near the largest device's sample count.
        timeout: Seconds each stage of the protocol waits for replies (``null``: no limit).
    """

    num_shares: float = 1.0
    reconstruction_threshold: float = 0.67
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 10000.0
    timeout: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0 < self.num_shares <= 1 or not 0 < self.reconstruction_threshold <= 1:
            raise ConfigError("secure_aggregation num_shares and reconstruction_threshold are shares in (0, 1], got "
                              f"{self.num_shares} and {self.reconstruction_threshold}")
        if not self.clipping_range > 0 or self.quantization_range < 2 or not self.max_weight >= 1:
            raise ConfigError("secure_aggregation needs clipping_range > 0, quantization_range >= 2 and "
                              f"max_weight >= 1, got {self.clipping_range}, {self.quantization_range}, "
                              f"{self.max_weight}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, as a config file would give it."""
        return asdict(self)


def update_keys(state: StateDict) -> list[str]:
    """The entries of a co-submodel that are averaged securely: its floating-point tensors, in state-dict order."""
    return [key for key, value in state.items() if value.is_floating_point()]


def update_arrays(copy: StateDict, start: StateDict) -> list[np.ndarray]:
    """A device's update as the arrays SecAgg+ masks: ``copy - start`` of every floating-point tensor."""
    return [(copy[key].double() - start[key].double()).numpy() for key in update_keys(start)]


def apply_mean_update(start: StateDict, arrays: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """``start`` plus the mean update SecAgg+ recovered (integer buffers keep ``start``'s values)."""
    keys = update_keys(start)
    if len(arrays) != len(keys):
        raise ValueError(f"the secure sum holds {len(arrays)} arrays but the co-submodel {len(keys)} float tensors")
    result = {key: value.clone() for key, value in start.items()}
    for key, array in zip(keys, arrays):
        update = torch.as_tensor(np.asarray(array), dtype=torch.float64).reshape(start[key].shape)
        result[key] = (start[key].double() + update).to(start[key].dtype)
    return result


def quantization_tolerance(settings: SecureAggregation, weights: Sequence[float]) -> float:
    """The most an entry of the recovered mean update may differ from the exact weighted mean (the quantisation
    error of every device's weighted entry, plus that of the weights themselves, relative to their total)."""
    ratios = [weight / settings.max_weight for weight in weights]
    step = 2 * settings.clipping_range / (settings.quantization_range - 1)
    total = sum(ratios)
    weight_error = len(ratios) / settings.quantization_range / total
    return len(ratios) * step / total + weight_error * settings.clipping_range
