"""The privacy boundary, checked on every stage's parsed and resolved config before anything runs.

Whatever the stage configs, ``stage_args`` or extra ``--config`` files say, a run is refused unless:

- each stage runs the module class its stage expects (or a subclass of it);
- each stage trains on the samples the plan gives it: a cloud stage never on device samples, a device stage only on
  its own device's share;
- the data section is the same for every stage (a device stage takes each device's share from it);
- every artifact path the plan hands a stage is the one it runs with, and a device stage reads no other file: it
  receives only the control model and the co-submodel.

Right before a device stage runs, :class:`DeviceGate` checks what it receives once more on the files themselves (a
control model and a co-submodel, nothing else) and, the first time, that they fit the device budget.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dcccl.artifacts.exports import load_export, load_network
from dcccl.artifacts.lineage import cloud_only_ancestors
from dcccl.errors import DCCCLError
from dcccl.federated.device_limits import DeviceBudget, check_device_budget
from dcccl.federated.ledger import Ledger
from dcccl.pipeline.config_snapshot import origin_of
from dcccl.pipeline.downlink import CloudTensors, cloud_side_source
from dcccl.pipeline.steps import StageCall

log = logging.getLogger("dcccl")

class BoundaryViolation(DCCCLError):
    """A stage's resolved config would carry something across the device/cloud boundary, or train on samples it
    must not see."""


@dataclass(frozen=True)
class ResolvedStage:
    """A stage call's config as the stage would run with it: parsed and resolved, nothing instantiated.

    Args:
        module_class: The LightningModule class the config resolves to.
        expected_class: The class the stage must run (or a subclass of it).
        data_partition: The training samples the module declares it trains on (``None``: none).
        model_args: The module's resolved init arguments (plain dicts and lists).
        data: The resolved data section: ``class_path`` and ``init_args``.
    """

    module_class: type
    expected_class: type
    data_partition: Optional[str]
    model_args: dict[str, Any]
    data: dict[str, Any]


def _where(call: StageCall) -> str:
    config = origin_of(call.config_files[-1])
    return f"stage {call.label!r} ({call.stage}; check stage_args.{call.stage} and {config})"


def _strings(value: Any) -> Iterator[str]:
    """Every string in ``value``, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _names_a_file(value: str, run_root: Path) -> bool:
    """Whether ``value`` names a file or a folder a device stage could read (a path, not a plain word)."""
    path = Path(value)
    inside_run = os.path.abspath(path).startswith(os.path.abspath(run_root) + os.sep)
    folder = path.is_dir() and (path.is_absolute() or os.sep in value or value in (".", ".."))
    return inside_run or folder or path.is_file() or (
        path.suffix in (".pt", ".pth", ".ckpt", ".safetensors", ".bin"))


def check_stage(call: StageCall, resolved: ResolvedStage, run_root: Path) -> None:
    """Refuse ``call`` if its resolved config breaks the boundary (see the module docstring).

    Raises:
        BoundaryViolation: Naming the stage, what is wrong and where to look.
    """
    cls, expected = resolved.module_class, resolved.expected_class
    if not (isinstance(cls, type) and issubclass(cls, expected)):
        raise BoundaryViolation(
            f"the {_where(call)} must run {expected.__module__}.{expected.__qualname__} or a subclass of it, but its "
            f"config resolves to {getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}")
    pinned = resolved.data.get("init_args", {}).get("partition")
    if resolved.data_partition != call.partition or pinned not in (None, call.partition):
        trains_on = pinned or resolved.data_partition
        raise BoundaryViolation(
            f"the {_where(call)} may train on {call.partition or 'no'} samples only, but its config makes it train on "
            f"{trains_on} samples")
    for key, planned in call.model_args.items():
        if resolved.model_args.get(key) != planned:
            raise BoundaryViolation(
                f"the {_where(call)} must receive {key}={planned!r} from the pipeline, but its config overrides it "
                f"with {resolved.model_args.get(key)!r}")
    data_args = resolved.data.get("init_args", {})
    for key, planned in call.data_args.items():
        if data_args.get(key) != planned:
            raise BoundaryViolation(
                f"the {_where(call)} must use data {key}={planned!r} from the pipeline, but its config overrides it "
                f"with {data_args.get(key)!r}")
    if call.stage == "device":
        given = {str(value) for value in call.model_args.values() if value is not None}
        extra = sorted({value for key, value in resolved.model_args.items() if key not in call.model_args
                        for value in _strings(value) if value not in given and _names_a_file(value, run_root)})
        if extra:
            raise BoundaryViolation(
                f"the {_where(call)} may receive only the control model and the co-submodel, but its config also "
                f"names {', '.join(extra)}")


def _shared_data(data: dict[str, Any]) -> dict[str, Any]:
    # The one data argument that differs between stage calls: the partition the runner pins for each (checked against
    # the call's own in check_stage).
    init_args = {key: value for key, value in data.get("init_args", {}).items() if key != "partition"}
    return {"class_path": data.get("class_path"), "init_args": init_args}


# Stages whose networks are never sent down: they may start from any weights file.
CLOUD_ONLY_STAGES: tuple[str, ...] = ("cloud", "evaluate", "centralized")


def check_downlink_sources(call: StageCall, resolved: ResolvedStage, run_root: Path) -> None:
    """Refuse a stage whose networks are sent down if a backbone of it starts from a cloud-side weights file
    (:func:`~dcccl.pipeline.downlink.cloud_side_source`).

    Raises:
        BoundaryViolation: Naming the stage, the file and why it is cloud-side.
    """
    if call.stage in CLOUD_ONLY_STAGES:
        return
    for spec in backbone_specs(resolved.model_args):
        checkpoint = spec.get("checkpoint_path")
        reason = cloud_side_source(str(checkpoint), run_root) if checkpoint else None
        if reason is not None:
            raise BoundaryViolation(
                f"the {_where(call)} builds a network that is sent to the devices from a cloud-side weights file: "
                f"{reason}; start it from scratch or from a weights file of its own (a split base's co-submodel "
                "is fine)")


def backbone_specs(value: Any) -> Iterator[dict[str, Any]]:
    """Every backbone spec (a mapping with ``name`` and ``checkpoint_path``) nested in ``value``, including base
    models nested in a spec's ``kwargs`` (the ``split`` backbone)."""
    if isinstance(value, dict):
        if {"name", "checkpoint_path"} <= set(value):
            yield value
        for item in value.values():
            yield from backbone_specs(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from backbone_specs(item)


def check_boundary(resolved: Sequence[tuple[StageCall, ResolvedStage]], run_root: Path) -> None:
    """Check every stage call (:func:`check_stage`, :func:`check_downlink_sources`) and that all of them share one
    data section.

    Raises:
        BoundaryViolation: For the first call that breaks the boundary.
    """
    reference: Optional[tuple[StageCall, dict[str, Any]]] = None
    for call, stage in resolved:
        check_stage(call, stage, run_root)
        check_downlink_sources(call, stage, run_root)
        data = _shared_data(stage.data)
        if reference is None:
            reference = (call, data)
        elif data != reference[1]:
            differing = sorted(key for key in set(data["init_args"]) | set(reference[1]["init_args"])
                               if data["init_args"].get(key) != reference[1]["init_args"].get(key))
            if data["class_path"] != reference[1]["class_path"]:
                differing.insert(0, "class_path")
            raise BoundaryViolation(
                f"every stage must see the same data, but the {_where(call)} differs from stage "
                f"{reference[0].label!r} in data {', '.join(differing)}")


class DeviceGate:
    """Checked right before each device stage runs: it receives only a control model and a co-submodel (by the
    roles recorded in the files), none of their tensors is one of the cloud submodel's (by content), and the first
    time, that the two fit the device budget.

    Args:
        budget: The device budget (``None``: no limits).
        sample_shape: Shape of one input sample (for the budget's FLOPs and memory figures).
        num_classes: Number of classes.
        cloud_submodel: The run's cloud submodel export (``None``: the run has none).
    """

    def __init__(self, budget: Optional[DeviceBudget] = None, sample_shape: Optional[tuple[int, ...]] = None,
                 num_classes: Optional[int] = None, cloud_submodel: Optional[Path] = None) -> None:
        self.budget = budget
        self.sample_shape = sample_shape
        self.num_classes = num_classes
        self.cloud_submodel = cloud_submodel
        self._ledger = Ledger()
        self._measured = False
        self._cloud: Optional[CloudTensors] = None
        self._checked: set[Path] = set()

    def __call__(self, call: StageCall) -> None:
        """Refuse the call (``LedgerViolation``, ``BoundaryViolation``, ``DeviceBudgetExceeded``) if what it receives
        does not pass."""
        if call.stage != "device":
            return
        for path in call.inputs:  # named after a device that receives it (the first, for what all receive)
            receivers = [task.device for task in call.devices if path == task.start or path in task.downlink]
            self._ledger.check(receivers[0] if receivers else 0, "down", path)
            self._check_not_cloud(Path(path))
        if self.budget is not None and not self._measured:
            self._check_budget(call)
            self._measured = True

    def _check_not_cloud(self, path: Path) -> None:
        """Refuse ``path`` if its lineage reaches a cloud-only export, or any of its tensors is one of the cloud
        submodel's (each file is read once)."""
        if path in self._checked:
            return
        export = load_export(path)
        ancestors = cloud_only_ancestors(export.lineage)
        if ancestors:
            raise BoundaryViolation(
                f"refusing to send {path} down to the devices: its weights descend from a cloud-only export "
                f"(SHA-256 {ancestors[0][:12]}..., a cloud submodel or a network trained on pooled samples): nothing "
                "sent down may start from one; check the checkpoint_path of the distill and cloud_round backbones")
        if self.cloud_submodel is not None and Path(self.cloud_submodel).is_file():
            if self._cloud is None:
                self._cloud = CloudTensors(load_export(self.cloud_submodel).state_dict)
            shared = self._cloud.shared_with(export.state_dict)
            if shared:
                shown = ", ".join(f"{name} = {cloud}" for name, cloud in shared[:3])
                raise BoundaryViolation(
                    f"refusing to send {path} down to the devices: {len(shared)} of its tensors are the cloud "
                    f"submodel's ({shown}{', ...' if len(shared) > 3 else ''}): nothing sent down may be made of the "
                    "cloud submodel's weights; check the checkpoint_path of the distill and cloud_round backbones")
        self._checked.add(path)

    def _check_budget(self, call: StageCall) -> None:
        if self.sample_shape is None or self.num_classes is None:
            raise ValueError("the device budget gate needs the sample shape and class count of the data")
        control = call.model_args.get("control_model")
        measured = check_device_budget(
            self.budget,  # type: ignore[arg-type]
            load_network(call.model_args["co_submodel"], "co_submodel"),
            load_network(control, "control_model") if control is not None else None,
            self.sample_shape, self.num_classes,
        )
        log.info("[dcccl] device budget respected: %s", ", ".join(f"{k} {v:,.0f}" for k, v in measured.items()))
