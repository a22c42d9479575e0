"""What every aggregation rule shares: which copies a round fuses, their weights, and the streaming fusion itself."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence, Set
from itertools import chain
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import torch

from dcccl.federated.aggregation.averaging import RunningAverage, rebase_update
from dcccl.registry import Registry

if TYPE_CHECKING:
    from dcccl.federated.fleet import FleetSpec

StateDict = Mapping[str, torch.Tensor]
# What a rule keeps from one round's fusion to the next (a server optimiser's moments): named groups of tensors,
# each keyed like the co-submodel's parameters.
ServerState = dict[str, dict[str, torch.Tensor]]


class AggregationRule(ABC):
    """How the cloud fuses its own copy of the co-submodel with the devices' copies at the end of a round.

    A rule answers four questions through hooks: which device copies a round fuses (:meth:`fused_copies`), with
    which weights (:meth:`weights`), with which weights per class for the classifier's rows (:meth:`row_weights`),
    and what a copy contributes (:meth:`contribution`). :meth:`fuse` streams the copies through running weighted
    sums, so memory does not grow with the fleet. A new rule is a subclass that overrides one hook and calls
    ``super()`` where it extends the default.
    """

    @property
    def needs_class_counts(self) -> bool:
        """Whether the rule needs each copy's samples per class (the devices then send them up with their copy)."""
        return False

    def secure_aggregation_refusal(self) -> Optional[str]:
        """Why the rule cannot fuse a round from the devices' weighted mean alone (secure aggregation), or ``None``
        when it can."""
        return f"{type(self).__name__} fuses each device copy on its own"

    @property
    def secure_weights_by_samples(self) -> bool:
        """Whether a device's weight in the secure sum is its sample count (else one)."""
        return True

    @property
    def needs_device_start(self) -> bool:
        """Whether :meth:`fuse` needs this round's device start as ``onto`` even when no copy is stale (a rule that
        looks at each copy's update)."""
        return False

    @property
    def keeps_server_state(self) -> bool:
        """Whether the rule keeps state from one round's fusion to the next (kept in the run directory)."""
        return False

    def server_step(self, mean: StateDict, start: StateDict, parameters: Set[str], state: ServerState,
                    round_index: int) -> tuple[dict[str, torch.Tensor], ServerState]:
        """The co-submodel the next round starts from, and the state to keep, given the round's fused copies.

        By default the weighted mean itself, keeping nothing.

        Args:
            mean: The weighted mean of the round's copies (:meth:`fuse`).
            start: The co-submodel the round started from.
            parameters: Names of the trainable parameters (the rest are buffers).
            state: What the rule kept after the previous round's fusion (empty in round 1).
            round_index: The round (counted from 1).
        """
        return dict(mean), {}

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

    def row_weights(self, weights: Sequence[float],
                    class_counts: Optional[Sequence[Sequence[int]]]) -> Optional[list[list[float]]]:
        """Per class, the weight of each copy in the classifier's row of that class (``None``: the plain weights).

        Args:
            weights: The copies' weights from :meth:`weights` (the cloud's first).
            class_counts: Each copy's samples per class, in the same order (when :attr:`needs_class_counts`).
        """
        return None

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
             parameters: Set[str], head_keys: Set[str] = frozenset(),
             class_counts: Optional[Sequence[Sequence[int]]] = None) -> dict[str, torch.Tensor]:
        """The fused co-submodel's state dict.

        Args:
            cloud_copy: The cloud's trained copy.
            cloud_count: Samples behind it.
            device_counts: Samples behind each device copy, in the order ``device_copies`` yields them.
            device_copies: ``(copy, base)`` per device copy, read one at a time; ``base`` is ``None`` for a copy of
                this round.
            onto: The model this round started from (needed when a copy is stale).
            parameters: Names of the trainable parameters (the rest are buffers).
            head_keys: Names of the classifier's parameters (rows = classes), for :meth:`row_weights`.
            class_counts: Each copy's samples per class, the cloud's first.
        """
        weights = self.weights(cloud_count, device_counts)
        per_class = self.row_weights(weights, class_counts) if head_keys else None
        running = RunningAverage()
        rows = _RowAverage(head_keys, per_class) if per_class is not None else None
        added = 0
        for position, (copy, base) in enumerate(chain([(cloud_copy, None)], device_copies)):
            contribution = copy if position == 0 else self.contribution(copy, base, onto, parameters)
            running.add(contribution, weights[position])
            if rows is not None:
                rows.add(contribution, position)
            added += position > 0
        if added != len(device_counts):
            raise ValueError(f"{len(device_counts)} device sample counts but {added} device copies")
        fused = running.result()
        if rows is not None:
            fused.update(rows.result(fused))
        return fused

    def settings(self) -> dict[str, Any]:
        """What the rule is configured with (its class and init arguments): part of the fusion's fingerprint."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", **vars(self)}


class _RowAverage:
    """Running per-class weighted sums of the classifier's rows (row ``c`` of every head tensor belongs to class c).

    A class whose weights are all zero keeps the plain average's row.
    """

    def __init__(self, head_keys: Set[str], per_class: list[list[float]]) -> None:
        self.keys = head_keys
        self.per_class = torch.tensor(per_class, dtype=torch.float64)  # (classes, copies)
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, state: StateDict, position: int) -> None:
        """Add copy number ``position``'s rows with its per-class weights."""
        weight = self.per_class[:, position]
        for key in self.keys:
            rows = state[key].detach().to(torch.float64)
            shaped = weight.reshape(-1, *([1] * (rows.dim() - 1)))
            self.sums[key] = self.sums.get(key, 0) + shaped * rows  # type: ignore[operator]

    def result(self, plain: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-class averages (the plain average's rows where a class has no weight)."""
        total = self.per_class.sum(dim=1)
        out = {}
        for key, summed in self.sums.items():
            shaped = total.reshape(-1, *([1] * (summed.dim() - 1)))
            averaged = torch.where(shaped > 0, summed / shaped.clamp_min(1e-300), plain[key].to(torch.float64))
            out[key] = averaged.to(plain[key].dtype)
        return out


RULES: Registry[type[AggregationRule]] = Registry("aggregation rule")

RuleClass = TypeVar("RuleClass", bound=type[AggregationRule])


def register_rule(rule: RuleClass) -> RuleClass:
    """Register the decorated rule class under its class name (``aggregation: {class_path: <name>}``)."""
    RULES.add(rule.__name__, rule)
    return rule
