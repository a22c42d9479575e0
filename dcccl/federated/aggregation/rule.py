"""What every aggregation rule shares: which copies a round fuses, their weights, and the streaming fusion itself."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any, Optional

import torch

from dcccl.federated.aggregation.averaging import RunningAverage, rebase_update

if TYPE_CHECKING:
    from dcccl.federated.fleet import FleetSpec

StateDict = Mapping[str, torch.Tensor]


class AggregationRule(ABC):
    """How the cloud fuses its own copy of the co-submodel with the devices' copies at the end of a round.

    A rule answers three questions through hooks: which device copies a round fuses (:meth:`fused_copies`), with
    which weights (:meth:`weights`), and what a copy contributes (:meth:`contribution`). :meth:`fuse` streams the
    copies through one running weighted sum, so memory does not grow with the fleet. A new rule is a subclass that
    overrides one hook and calls ``super()`` where it extends the default.
    """

    def fused_copies(self, fleet: FleetSpec, seed: int, round_index: int) -> list[tuple[int, int]]:
        """``(device, round)`` of every device copy the fusion of ``round_index`` averages.

        By default: the copies of the devices that reported in this round.
        """
        return [(device, round_index) for device in fleet.reporting(seed, round_index)]

    @abstractmethod
    def weights(self, cloud_count: int, device_counts: Sequence[int]) -> list[float]:
        """Weights of the cloud's copy (first) and the device copies (in order), summing to one.

        Args:
            cloud_count: Samples behind the cloud's copy.
            device_counts: Samples behind each device copy.
        """

    def contribution(self, copy: StateDict, base: Optional[StateDict], onto: Optional[StateDict],
                     parameters: Set[str]) -> StateDict:
        """What one device copy adds to the average: the copy itself; a copy from an earlier round (``base`` is
        the model it started from) contributes its update, re-applied to this round's starting model ``onto``."""
        if base is None:
            return copy
        if onto is None:
            raise ValueError("a stale copy needs the model this round started from to be re-based onto")
        return rebase_update(copy, base, onto, parameters)

    def fuse(self, cloud_copy: StateDict, cloud_count: int, device_counts: Sequence[int],
             device_copies: Iterable[tuple[StateDict, Optional[StateDict]]], onto: Optional[StateDict],
             parameters: Set[str]) -> dict[str, torch.Tensor]:
        """The fused co-submodel's state dict.

        Args:
            cloud_copy: The cloud's trained copy.
            cloud_count: Samples behind it.
            device_counts: Samples behind each device copy, in the order ``device_copies`` yields them.
            device_copies: ``(copy, base)`` per device copy, read one at a time; ``base`` is ``None`` for a copy of
                this round.
            onto: The model this round started from (needed when a copy is stale).
            parameters: Names of the trainable parameters (the rest are buffers).
        """
        weights = self.weights(cloud_count, device_counts)
        running = RunningAverage()
        running.add(cloud_copy, weights[0])
        added = 0
        for (copy, base), weight in zip(device_copies, weights[1:]):
            running.add(self.contribution(copy, base, onto, parameters), weight)
            added += 1
        if added != len(device_counts):
            raise ValueError(f"{len(device_counts)} device sample counts but {added} device copies")
        return running.result()

    def settings(self) -> dict[str, Any]:
        """What the rule is configured with (its class and init arguments): part of the fusion's fingerprint."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", **vars(self)}
