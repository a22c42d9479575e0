"""Fusion as a step of the plan: the cloud's copy and the device copies of a round, fused by the aggregation rule
into the co-submodel the next round starts from. A plain function over exports: no Trainer, no data."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dcccl.errors import ConfigError
from dcccl.federated.aggregation import AggregationRule
from dcccl.federated.aggregation.rule import ServerState
from dcccl.run.atomic import atomic_torch_save
from dcccl.run.exports import NetworkExport, load_export, save_export
from dcccl.run.ranks import is_global_zero
from dcccl.run.steps import LocalStep

log = logging.getLogger("dcccl")


@dataclass(frozen=True)
class FusionStep(LocalStep):
    """Fuse the round's copies of the co-submodel and export the result.

    Args:
        label: Human-readable name for progress messages.
        restart_point: The restart point the step belongs to.
        outputs: The fused co-submodel's export (one path).
        inputs: Every export the fusion reads.
        round_index: The round.
        rule: The aggregation rule.
        cloud_copy: Export of the cloud's trained copy.
        device_copies: Exports of the device copies the rule chose (may be empty: nobody reported).
        device_bases: Per device copy, the co-submodel it started from when it is older than this round
            (``None`` for a copy of this round).
        rebase_onto: The co-submodel this round's devices started from (needed when a copy is older than this round).
        round_start: The co-submodel the round started from (for a rule that keeps server state: the fused mean minus
            it is the server optimiser's pseudo-gradient).
        state_in: What the rule kept after the previous round's fusion (``None``: nothing, round 1).
        state_out: Where the rule keeps its state after this round's fusion (also one of the ``outputs``).
    """

    rule: Optional[AggregationRule] = None
    cloud_copy: Path = Path()
    device_copies: tuple[Path, ...] = ()
    device_bases: tuple[Optional[Path], ...] = ()
    rebase_onto: Optional[Path] = None
    round_start: Optional[Path] = None
    state_in: Optional[Path] = None
    state_out: Optional[Path] = None

    def describe(self) -> dict[str, Any]:
        """The rule's settings and which copies it fuses."""
        return {
            "step": "fusion",
            "rule": self.rule.settings() if self.rule is not None else None,
            "cloud_copy": str(self.cloud_copy),
            "device_copies": [str(path) for path in self.device_copies],
            "device_bases": [None if base is None else str(base) for base in self.device_bases],
            "rebase_onto": None if self.rebase_onto is None else str(self.rebase_onto),
            **({"round_start": str(self.round_start), "state_in": None if self.state_in is None else str(self.state_in),
                "state_out": str(self.state_out)} if self.state_out is not None else {}),
        }

    def run(self) -> None:
        """Read the copies one at a time, fuse them and write the fused export (on global rank zero)."""
        if not is_global_zero():
            return
        export, state = fuse_exports(self)
        if self.state_out is not None:
            save_server_state(state, self.round_index, self.state_out)
        save_export(export, self.outputs[0])

    def _device_states(self, onto: Optional[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Optional[dict]]]:
        for path, base in zip(self.device_copies, self.device_bases):
            yield (load_export(path, "co_submodel").state_dict,
                   None if base is None else load_export(base, "co_submodel").state_dict)


def _trained_copy(path: Path, num_classes: Optional[int]) -> NetworkExport:
    export = load_export(path, "co_submodel")
    if export.sample_count is None:
        raise ConfigError(f"{path} records no sample count; it is not a trained co-submodel copy")
    if num_classes is not None and export.num_classes != num_classes:
        raise ConfigError(f"{path} predicts {export.num_classes} classes but the cloud's copy {num_classes}: fuse only "
                          "copies of the co-submodel trained on the same data")
    return export


def head_keys(network: nn.Module) -> set[str]:
    """The state-dict keys of the network's classifier, found through timm's head API.

    Raises:
        ConfigError: The network has no ``get_classifier()``.
    """
    get_classifier = getattr(network, "get_classifier", None)
    if not callable(get_classifier):
        raise ConfigError(f"class-aware fusion needs timm's head API, but the co-submodel ({type(network).__name__}) "
                          "has no get_classifier(): set aggregation class_aware_head: false, or give the network "
                          "timm's head API")
    classifier = get_classifier()
    prefixes = [name for name, module in network.named_modules() if module is classifier]
    return {key for key in network.state_dict() if any(key.startswith(f"{prefix}.") for prefix in prefixes)}


def _reported(export: NetworkExport) -> tuple[int, Optional[list[int]]]:
    """What a copy's device reported with it (its sample count and samples per class), without its weights."""
    return export.sample_count or 0, export.class_counts


def load_server_state(path: Optional[Path], round_index: int) -> ServerState:
    """What the aggregation rule kept after round ``round_index`` (empty: no path, round 1)."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"the server state {path} of round {round_index} is missing (that round's fusion must "
                                "run first)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("round") != round_index:
        raise ConfigError(f"{path} holds the server state of round {payload.get('round')}, not of round {round_index}: "
                          "run the rounds again (--from_stage rounds)")
    return dict(payload["state"])


def save_server_state(state: ServerState, round_index: int, path: Path) -> None:
    """Keep the rule's ``state`` after round ``round_index`` at ``path`` (written whole or not at all)."""
    atomic_torch_save({"round": round_index, "state": state}, path)


def fuse_exports(step: FusionStep) -> tuple[NetworkExport, ServerState]:
    """The fused co-submodel of ``step`` (weights from the rule, the sample count of all copies together) and what
    the rule keeps for the next round.

    Two passes over the device copies (their sample counts, then their weights), one copy in memory at a time.
    """
    rule = step.rule
    if rule is None:
        raise ValueError("a fusion step needs an aggregation rule")
    cloud = _trained_copy(step.cloud_copy, None)
    reported = [_reported(_trained_copy(path, cloud.num_classes)) for path in step.device_copies]
    counts = [sample_count for sample_count, _ in reported]
    class_counts = [cloud.class_counts, *(per_class for _, per_class in reported)]
    if rule.needs_class_counts and any(entry is None for entry in class_counts):
        missing = [str(path) for path, entry in zip((step.cloud_copy, *step.device_copies), class_counts)
                   if entry is None]
        raise ConfigError(f"the aggregation rule fuses class by class but {', '.join(missing)} records no samples "
                          "per class: run the round again with this rule (--from_stage rounds)")
    onto = load_export(step.rebase_onto, "co_submodel").state_dict if step.rebase_onto is not None else None
    network = cloud.build()
    parameters = {name for name, _ in network.named_parameters()}
    keys = head_keys(network) if rule.needs_class_counts else set()
    weights = rule.weights(cloud.sample_count or 0, counts)
    log.info("[dcccl] fusion weights: cloud %.3f, devices %s", weights[0],
             ", ".join(f"{w:.3f}" for w in weights[1:]) or "none reported")
    fused = rule.fuse(cloud.state_dict, cloud.sample_count or 0, counts, step._device_states(onto), onto,
                      parameters, keys, class_counts if rule.needs_class_counts else None)  # type: ignore[arg-type]
    state: ServerState = {}
    if rule.keeps_server_state:
        if step.round_start is None:
            raise ValueError("a rule that keeps server state needs the co-submodel the round started from")
        start = load_export(step.round_start, "co_submodel").state_dict
        kept = load_server_state(step.state_in, step.round_index - 1)
        fused, state = rule.server_step(fused, start, parameters, kept, step.round_index)
    total = (cloud.sample_count or 0) + sum(counts)
    summed = [sum(column) for column in zip(*class_counts)] if all(c is not None for c in class_counts) else None
    return NetworkExport(cloud.role, cloud.backbone, cloud.num_classes, cloud.in_chans, fused, total,
                         summed), state  # type: ignore[arg-type]
