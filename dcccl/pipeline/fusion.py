"""Fusion as a step of the plan: the cloud's copy and the device copies of a round, fused by the aggregation rule
into the co-submodel the next round starts from. A plain function over exports: no Trainer, no data."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dcccl.artifacts.atomic import atomic_torch_save, atomic_write_json
from dcccl.artifacts.exports import ExportError, NetworkExport, load_export, save_export
from dcccl.artifacts.lineage import lineage_of
from dcccl.errors import ConfigError
from dcccl.federated.aggregation import AggregationRule
from dcccl.federated.aggregation.rule import ServerState
from dcccl.federated.replies import ReplyVerdict, reply_problems
from dcccl.pipeline.steps import LocalStep
from dcccl.ranks import is_global_zero

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
        device_ids: Per device copy, the device that sent it (``-1``: the secure sum of the round's devices).
        device_rounds: Per device copy, the round it was trained in.
        device_starts: Per device copy, the co-submodel the cloud sent it to train (what it must be a copy of).
        reply_verdicts: Where the cloud's verdict on each device copy is written (also one of the ``outputs``).
        share_of: Per device copy, the devices whose samples it may count (one, or a secure sum's members).
        device_shares: Every device's number of training samples, when the cloud knows them (a simulated fleet);
            set by the execution from the data (empty: the counts are checked for plausibility only).
    """

    rule: Optional[AggregationRule] = None
    cloud_copy: Path = Path()
    device_copies: tuple[Path, ...] = ()
    device_bases: tuple[Optional[Path], ...] = ()
    rebase_onto: Optional[Path] = None
    round_start: Optional[Path] = None
    state_in: Optional[Path] = None
    state_out: Optional[Path] = None
    device_ids: tuple[int, ...] = ()
    device_rounds: tuple[int, ...] = ()
    device_starts: tuple[Path, ...] = ()
    reply_verdicts: Optional[Path] = None
    share_of: tuple[tuple[int, ...], ...] = ()
    device_shares: tuple[int, ...] = ()

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
        """Check every device copy, fuse the accepted ones with the cloud's (one copy in memory at a time) and write
        the verdicts, the rule's state and the fused export (on global rank zero)."""
        if not is_global_zero():
            return
        verdicts = self.check_replies()
        export, state = fuse_exports(self, [verdict.accepted for verdict in verdicts])
        if self.reply_verdicts is not None:
            atomic_write_json(self.reply_verdicts, {"replies": [verdict.to_dict() for verdict in verdicts]})
        if self.state_out is not None:
            save_server_state(state, self.round_index, self.state_out)
        save_export(export, self.outputs[0])

    def share_limit(self, position: int) -> Optional[int]:
        """The most samples device copy number ``position`` may count (``None``: the shares are unknown)."""
        if not self.device_shares:
            return None
        members = self.share_of[position] if self.share_of else (self.device_ids[position],)
        return sum(self.device_shares[device] for device in members)

    def check_replies(self) -> list[ReplyVerdict]:
        """The cloud's verdict on each device copy (:func:`~dcccl.federated.replies.reply_problems`); a refused
        copy is left out of the fusion, its reason logged. The verdict depends on the files alone, so a resumed
        run decides as the interrupted one did."""
        verdicts = []
        sent: dict[Path, NetworkExport] = {}
        for position, path in enumerate(self.device_copies):
            device = self.device_ids[position] if self.device_ids else position
            round_index = self.device_rounds[position] if self.device_rounds else self.round_index
            if self.device_starts:
                start = self.device_starts[position]
                if start not in sent:
                    sent[start] = load_export(start, "co_submodel")
                try:
                    reply = load_export(path)
                except ExportError as err:
                    problems = [f"it is not a readable export ({err})"]
                else:
                    problems = reply_problems(reply, sent[start], self.share_limit(position))
                    if self.rule is not None and self.rule.needs_class_counts and reply.class_counts is None:
                        problems.append("it reports no samples per class, which the aggregation rule needs")
            else:
                problems = []
            who = "the secure sum" if device < 0 else f"device {device}'s copy"
            if problems:
                log.warning("[dcccl] round %d: refused %s of round %d: %s", self.round_index, who, round_index,
                            "; ".join(problems))
            verdicts.append(ReplyVerdict(device, round_index, not problems, "; ".join(problems)))
        return verdicts

    def _device_states(self, accepted: Sequence[bool], onto: Optional[dict[str, Any]]
                       ) -> Iterator[tuple[dict[str, Any], Optional[dict]]]:
        for path, base, keep in zip(self.device_copies, self.device_bases, accepted):
            if keep:
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


def fuse_exports(step: FusionStep, accepted: Optional[Sequence[bool]] = None) -> tuple[NetworkExport, ServerState]:
    """The fused co-submodel of ``step`` (weights from the rule, the sample count of all fused copies together)
    and what the rule keeps for the next round.

    Two passes over the device copies (their sample counts, then their weights), one copy in memory at a time.

    Args:
        step: The fusion.
        accepted: Per device copy, whether it is fused (default: every copy; see :meth:`FusionStep.check_replies`).
    """
    rule = step.rule
    if rule is None:
        raise ValueError("a fusion step needs an aggregation rule")
    keep = list(accepted) if accepted is not None else [True] * len(step.device_copies)
    cloud = _trained_copy(step.cloud_copy, None)
    reported = [_reported(_trained_copy(path, cloud.num_classes))
                for path, kept in zip(step.device_copies, keep) if kept]
    counts = [sample_count for sample_count, _ in reported]
    class_counts = [cloud.class_counts, *(per_class for _, per_class in reported)]
    if rule.needs_class_counts and cloud.class_counts is None:
        raise ConfigError(f"the aggregation rule fuses class by class but {step.cloud_copy} records no samples per "
                          "class: run the round again with this rule (--from_stage rounds)")
    onto = load_export(step.rebase_onto, "co_submodel").state_dict if step.rebase_onto is not None else None
    network = cloud.build()
    parameters = {name for name, _ in network.named_parameters()}
    keys = head_keys(network) if rule.needs_class_counts else set()
    weights = rule.weights(cloud.sample_count or 0, counts)
    log.info("[dcccl] fusion weights: cloud %.3f, devices %s", weights[0],
             ", ".join(f"{w:.3f}" for w in weights[1:]) or "none reported")
    fused = rule.fuse(cloud.state_dict, cloud.sample_count or 0, counts, step._device_states(keep, onto), onto,
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
    averaged = [step.cloud_copy, *(path for path, kept in zip(step.device_copies, keep) if kept)]
    return NetworkExport(cloud.role, cloud.backbone, cloud.num_classes, cloud.in_chans, fused, total,
                         summed, None, lineage_of(averaged)), state  # type: ignore[arg-type]
