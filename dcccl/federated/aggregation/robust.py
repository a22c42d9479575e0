"""Aggregation that a few lying devices cannot steer: the arithmetic (pure functions over stacked copies) and the
rule every robust rule shares.

A robust rule replaces the weighted mean of the device copies by a statistic that ignores outliers (a coordinate-wise
median, a trimmed mean, the copies Krum trusts, updates clipped to a common norm). The cloud's copy is trusted: it
keeps its share ``cloud_share`` and the devices' robust aggregate the rest. The statistics follow Flower's
``aggregate_median``, ``aggregate_trimmed_avg`` and ``aggregate_krum`` (``flwr.server.strategy.aggregate``; the
tests compare them), in torch and on the copies' updates: every copy a rule sees is expressed on this round's
device start (a stale copy's update re-applied to it), so a statistic of the copies is that start plus the statistic
of the updates. The copies are held in memory together (a fleet's reporting devices, not the whole fleet).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any, Optional

import torch

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.rule import AggregationRule, ServerState, StateDict

Stacked = dict[str, torch.Tensor]  # per float entry: the copies stacked along a first axis, in float64


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """The median along the first axis, the mean of the two middle values for an even count (as ``numpy.median``)."""
    ordered = stacked.sort(dim=0).values
    count = stacked.shape[0]
    middle = ordered[(count - 1) // 2]
    return middle if count % 2 else (middle + ordered[count // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, fraction: float) -> torch.Tensor:
    """The mean along the first axis of what is left after cutting ``int(fraction * n)`` values off each end, per
    coordinate (as ``scipy.stats.trim_mean``)."""
    if not 0.0 <= fraction < 0.5:
        raise ConfigError(f"the trimmed fraction must lie in [0, 0.5), got {fraction}")
    count = stacked.shape[0]
    cut = int(fraction * count)
    return stacked.sort(dim=0).values[cut:count - cut].mean(dim=0)


def squared_distances(flat: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``flat`` (copies by coordinates)."""
    return torch.cdist(flat, flat).pow(2)


def krum_scores(flat: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Each copy's Krum score: the sum of its squared distances to its ``n - byzantine - 2`` nearest others (at
    least one); the lowest score is the copy most surrounded by others."""
    count = flat.shape[0]
    nearest = max(1, count - byzantine - 2)
    distances = squared_distances(flat)
    ordered = distances.sort(dim=1).values[:, 1:nearest + 1]  # column 0: the copy itself
    return ordered.sum(dim=1)


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The Euclidean norm of an update over all its entries."""
    return float(sum(float((value.double() ** 2).sum()) for value in update.values()) ** 0.5)


class RobustRule(AggregationRule):
    """The cloud's copy with its share, the device copies through a robust statistic (:meth:`combine`); optionally
    followed by a server optimiser's step, as the fleet configs use.

    Args:
        cloud_share: λ, the cloud copy's share; the devices' robust aggregate has ``1 - λ``.
        server: A server optimiser (e.g. ``{class_path: FedAdam, init_args: {server_lr: 0.01}}``) that takes the
            robust aggregate as its round's mean; its own ``cloud_share`` and weighting are not used, its
            ``latest_updates`` is.
    """

    def __init__(self, cloud_share: float = 0.5, server: Optional[AggregationRule] = None) -> None:
        if not 0.0 <= cloud_share <= 1.0:
            raise ConfigError(f"aggregation cloud_share must lie in [0, 1], got {cloud_share}")
        if server is not None and not server.keeps_server_state:
            raise ConfigError(f"aggregation server must be a server optimiser (FedAvgM, FedAdam, FedYogi), got "
                              f"{type(server).__name__}")
        self.cloud_share = cloud_share
        self.server = server

    def secure_aggregation_refusal(self) -> Optional[str]:
        """A robust statistic looks at each copy: secure aggregation shows the cloud only their mean."""
        return f"{type(self).__name__} looks at each device copy, and secure aggregation shows only their mean"

    @property
    def keeps_server_state(self) -> bool:
        """With a server optimiser, its state."""
        return self.server is not None

    def server_step(self, mean: StateDict, start: StateDict, parameters: Set[str], state: ServerState,
                    round_index: int) -> tuple[dict[str, torch.Tensor], ServerState]:
        """The server optimiser's step on the robust aggregate (without one, the aggregate itself)."""
        if self.server is None:
            return super().server_step(mean, start, parameters, state, round_index)
        return self.server.server_step(mean, start, parameters, state, round_index)

    def fused_copies(self, fleet: Any, seed: int, round_index: int) -> list[tuple[int, int]]:
        """This round's copies, or those the server optimiser chooses (``latest_updates``)."""
        if self.server is not None:
            return self.server.fused_copies(fleet, seed, round_index)
        return super().fused_copies(fleet, seed, round_index)

    def weights(self, cloud_count: int, device_counts: Sequence[int]) -> list[float]:
        """λ for the cloud's copy, the rest split evenly among the devices (the statistic ignores the counts)."""
        if not device_counts:
            return [1.0]
        return [self.cloud_share] + [(1.0 - self.cloud_share) / len(device_counts)] * len(device_counts)

    @abstractmethod
    def combine(self, stacked: Stacked, counts: Sequence[int], start: Optional[StateDict],
                parameters: Set[str]) -> dict[str, torch.Tensor]:
        """The devices' robust aggregate, per float entry (float64).

        Args:
            stacked: Every float entry of the device copies, stacked along a first axis (copies in order).
            counts: The copies' sample counts.
            start: This round's device start (only for a rule whose :attr:`needs_device_start` is set).
            parameters: Names of the trainable parameters (the rest are buffers).
        """

    def fuse(self, cloud_copy: StateDict, cloud_count: int, device_counts: Sequence[int],
             device_copies: Iterable[tuple[StateDict, Optional[StateDict]]], onto: Optional[StateDict],
             parameters: Set[str], head_keys: Set[str] = frozenset(),
             class_counts: Optional[Sequence[Sequence[int]]] = None) -> dict[str, torch.Tensor]:
        """``λ · cloud + (1 - λ) · combine(device copies)`` per float entry; integer entries from the cloud's copy."""
        contributions = [self.contribution(copy, base, onto, parameters) for copy, base in device_copies]
        if len(contributions) != len(device_counts):
            raise ValueError(f"{len(device_counts)} device sample counts but {len(contributions)} device copies")
        if not contributions:
            return {key: value.clone() for key, value in cloud_copy.items()}
        floats = [key for key, value in cloud_copy.items() if value.is_floating_point()]
        stacked = {key: torch.stack([c[key].detach().to(torch.float64) for c in contributions]) for key in floats}
        robust = self.combine(stacked, device_counts, onto, parameters)
        fused = {}
        for key, value in cloud_copy.items():
            if key in robust:
                mixed = self.cloud_share * value.detach().to(torch.float64) + (1.0 - self.cloud_share) * robust[key]
                fused[key] = mixed.to(value.dtype)
            else:
                fused[key] = value.clone()
        return fused

    def settings(self) -> dict[str, Any]:
        """The rule's class and settings, the server optimiser's nested."""
        settings = super().settings()
        settings["server"] = None if self.server is None else self.server.settings()
        return settings
