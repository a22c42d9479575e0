"""The protocol every compared method follows: a name and a title, a plan built from DC-CCL's own settings, the
metrics it reports and what it costs on a device.

A method runs in its own run directory under DC-CCL's (``baselines/<name>/``) and may take DC-CCL's artifacts
(the cloud submodel, the initial co-submodel) as inputs; the coordinator then re-runs it when DC-CCL rebuilds them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar

import torch
from torch import nn

from dcccl.artifacts.exports import Role, load_network
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.errors import ConfigError
from dcccl.federated.costs import (
    parameter_count,
    peak_training_memory_bytes,
    state_dict_bytes,
    training_flops_per_sample,
)
from dcccl.federated.ledger import SAMPLE_COUNT_BYTES
from dcccl.model.freeze import freeze
from dcccl.pipeline.metrics import collect_metrics
from dcccl.pipeline.plan import Plan
from dcccl.pipeline.settings import PipelineSettings
from dcccl.pipeline.stages import STAGES
from dcccl.registry import Registry

WIRE_KEYS = ("downlink_bytes_once", "uplink_bytes_once", "downlink_bytes_per_round", "uplink_bytes_per_round")
NOTHING_ON_DEVICE = {"device_params": 0, "device_train_flops_per_sample": 0.0, "device_peak_train_memory_bytes": 0}


@dataclass
class CostContext:
    """What measuring a method's costs needs: a device training batch and the runs' exports.

    Args:
        x: One device training batch (inputs).
        y: Its labels.
        device_sample_bytes: Bytes of every raw device training sample (what uploading them would cost).
        reference: DC-CCL's run directory.
        run: The method's own run directory.
    """

    x: torch.Tensor
    y: torch.Tensor
    device_sample_bytes: int
    reference: RunDirectory
    run: RunDirectory
    _networks: dict[tuple[Path, str], nn.Module] = field(default_factory=dict)

    def network(self, path: Path, role: Role) -> nn.Module:
        """The network of an export (loaded once)."""
        key = (path, role)
        if key not in self._networks:
            self._networks[key] = load_network(path, role)
        return self._networks[key]

    def on_device(self, trainable: nn.Module, guide: Optional[nn.Module] = None) -> dict[str, Any]:
        """Parameters, FLOPs per sample and peak memory of one device training step (``guide`` frozen)."""
        guide = freeze(guide) if guide is not None else None
        return {
            "device_params": parameter_count(trainable) + (parameter_count(guide) if guide is not None else 0),
            "device_train_flops_per_sample": training_flops_per_sample(trainable, self.x, self.y, guide),
            "device_peak_train_memory_bytes": peak_training_memory_bytes(trainable, self.x, self.y, guide),
        }

    @staticmethod
    def wire(down_once: int = 0, up_once: int = 0, down_per_round: int = 0, up_per_round: int = 0) -> dict[str, int]:
        """Bytes on the wire: once per device and per round, each way."""
        return dict(zip(WIRE_KEYS, (down_once, up_once, down_per_round, up_per_round)))

    def co_submodel_rounds(self, co_submodel: nn.Module) -> dict[str, int]:
        """The co-submodel down and up every round (with the sample count that goes up with it)."""
        size = state_dict_bytes(co_submodel)
        return self.wire(down_per_round=size, up_per_round=size + SAMPLE_COUNT_BYTES)


def plain_cross_entropy_on_devices(settings: PipelineSettings) -> dict[str, list[str]]:
    """``settings``' stage_args with the device stage trained by plain cross-entropy (the hinge switched off), as
    baselines without a guide train."""
    return {**settings.stage_args, "device": [*settings.stage_args.get("device", []), "--model.init_args.margin=null"]}


class Method(ABC):
    """One method of the comparison.

    Class attributes:
        name: Key in ``comparison.json`` and the folder under ``baselines/``.
        title: Row title in the tables and plots.
        position: Row order in the tables (smaller first).
        privacy_violating: Needs raw device samples on the cloud (an upper bound, not a deployable method).
        per_round: Trains in rounds, so its served accuracy per round is plotted.
        needs_stages: Stage configs it needs besides the pipeline's (``stages.<name>`` in the pipeline config).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    position: ClassVar[int]
    privacy_violating: ClassVar[bool] = False
    per_round: ClassVar[bool] = True
    needs_stages: ClassVar[tuple[str, ...]] = ()

    def settings(self, reference: PipelineSettings) -> PipelineSettings:
        """The method's settings: DC-CCL's, in its own run directory (override to change what it trains)."""
        return replace(reference, name=self.name, run_dir=str(reference.run.root / "baselines" / self.name))

    @abstractmethod
    def plan(self, settings: PipelineSettings, reference: RunDirectory) -> Plan:
        """The method's steps (its settings from :meth:`settings`; ``reference`` is DC-CCL's run directory)."""

    def metrics(self, settings: PipelineSettings, plan: Plan, reference: RunDirectory) -> dict[str, Any]:
        """What the method reports, after its plan ran: by default the pipeline's ``metrics.json``."""
        return collect_metrics(settings, plan, settings.run)

    def reused_stage_dirs(self, reference: RunDirectory) -> list[Path]:
        """The stage directories of DC-CCL's run whose training the method's served model takes over (their
        sample passes count towards its budget)."""
        return []

    @abstractmethod
    def costs(self, context: CostContext) -> dict[str, Any]:
        """What it costs on a device and on the wire, and its served model's parameters (``model_params``)."""


METHODS: Registry[Method] = Registry("method")

MethodClass = TypeVar("MethodClass", bound=type[Method])


def register_method(method: MethodClass) -> MethodClass:
    """Register the decorated :class:`Method` subclass (one instance of it) under its ``name``."""
    METHODS.add(method.name, method())
    return method


def registered() -> list[Method]:
    """Every registered method, in table order."""
    return sorted(METHODS.values(), key=lambda method: method.position)


def select(names: Optional[Sequence[str]]) -> list[Method]:
    """The methods called ``names`` (every registered one for ``None``), in table order.

    Raises:
        ConfigError: A name that no method has.
    """
    unknown = sorted(set(names or []) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown methods {unknown}: choose among {METHODS.names()}")
    return [method for method in registered() if names is None or method.name in names]


def stage_names() -> set[str]:
    """Every stage a pipeline config may name: the registered stages and those the registered methods need."""
    return {*STAGES, *(name for method in METHODS.values() for name in method.needs_stages)}
