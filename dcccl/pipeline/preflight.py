"""Checks of a plan made before it writes anything, so that bad input leaves a run directory as it was.

What the data and each stage config say is checked by their owners (the DataModule when it loads, the stage
parser, the backbone registry); what is checked here is how they meet each other and the run directory: the
privacy boundary on every resolved stage config, the backbones they name, the artifacts a re-run would keep, the
device budget and the head API that head fine-tuning needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import nn

from dcccl.artifacts.exports import check_export_fits, load_network
from dcccl.backbones.builders import check_backbone
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError, DCCCLError
from dcccl.federated.device_limits import check_device_budget
from dcccl.federated.privacy import check_trainable, require_opacus
from dcccl.pipeline.boundary import ResolvedStage, backbone_specs, check_boundary
from dcccl.pipeline.settings import PipelineSettings
from dcccl.pipeline.steps import StageCall

if TYPE_CHECKING:
    from dcccl.pipeline.coordinator import Decision, StageRunner


@dataclass(frozen=True)
class DataDescription:
    """What the checks and the reports need to know of the data (the DataModule computes it).

    Args:
        num_classes: Number of classes.
        in_chans: Input channels.
        sample_shape: Shape of one input sample.
        device_labels: Label of every device-side training sample.
        device_parts: Positions in the device-side samples of each device's share.
    """

    num_classes: int
    in_chans: int
    sample_shape: tuple[int, ...]
    device_labels: np.ndarray
    device_parts: list[np.ndarray]


def resolve_stages(plan: Sequence[Any], runner: StageRunner) -> list[tuple[StageCall, ResolvedStage]]:
    """Every stage call of ``plan`` with the config its stage would run with."""
    return [(step, runner.resolve(step)) for step in plan if isinstance(step, StageCall)]


def kept_artifacts(decisions: Sequence[Decision]) -> list[Path]:
    """The artifacts the coordinator would keep rather than make again."""
    return [path for decision in decisions if not decision.runs for path in decision.step.outputs]


def check_kept_exports(kept: Sequence[Path], data: DataDescription, run_root: Path) -> None:
    """Refuse a run directory whose kept exports were trained for other data.

    Raises:
        ExportError: A kept export is unreadable, or predicts another number of classes, or reads another number
            of channels.
    """
    for path in kept:
        if path.suffix == ".pt":
            check_export_fits(path, data.num_classes, data.in_chans, advice=f"the run directory {run_root} holds a "
                              "run on other data; use another --run_dir, or --force to train every stage again")


def _resolved_spec(resolved: Sequence[tuple[StageCall, ResolvedStage]], stage: str,
                   key: str) -> Optional[BackboneSpec]:
    value = next((r.model_args.get(key) for call, r in resolved if call.stage == stage), None)
    return BackboneSpec.from_dict(dict(value)) if isinstance(value, dict) else None


def _network(kept: Optional[Path], role: Any, spec: Optional[BackboneSpec], data: DataDescription,
             device: Optional[str] = None) -> Optional[nn.Module]:
    if kept is not None:
        return load_network(kept, role)
    if spec is None:
        return None
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return spec.without_weights().build(data.num_classes, data.in_chans)


def check_budget_before_running(settings: PipelineSettings, kept: Sequence[Path],
                                resolved: Sequence[tuple[StageCall, ResolvedStage]],
                                data: DataDescription) -> Optional[dict[str, Any]]:
    """Measure the on-device part against the device budget before any stage runs; returns the figures.

    The control model and the co-submodel are the kept exports where the run directory has them, otherwise
    built untrained from their resolved backbone specs (the budget depends on the architecture only). When a network
    is neither kept nor described by a spec, nothing is checked here: the device gate still checks the exports
    before the first device trains.

    Raises:
        DeviceBudgetExceeded: The on-device part does not fit; the message names every figure over its limit.
    """
    if settings.device_budget is None:
        return None
    run = settings.run
    co_submodel = _network(run.initial_co_submodel if run.initial_co_submodel in kept else None, "co_submodel",
                           _resolved_spec(resolved, "cloud_round", "co_backbone"), data)
    control_model = None
    if settings.device_guide == "control_model":
        control_model = _network(run.control_model if run.control_model in kept else None, "control_model",
                                 _resolved_spec(resolved, "distill", "backbone"), data)
        if control_model is None:
            return None
    if co_submodel is None:
        return None
    return check_device_budget(settings.device_budget, co_submodel, control_model, data.sample_shape,
                               data.num_classes)


def check_head_api(settings: PipelineSettings, resolved: Sequence[tuple[StageCall, ResolvedStage]],
                   data: DataDescription) -> None:
    """With ``finetune_head``, refuse a co-submodel without timm's head API before anything trains.

    Raises:
        ConfigError: The co-submodel has no ``get_classifier()``; the message names the option.
    """
    if not settings.finetune_head:
        return
    spec = _resolved_spec(resolved, "cloud_round", "co_backbone")
    network = _network(None, "co_submodel", spec, data, device="meta") if spec is not None else None
    if network is not None and not callable(getattr(network, "get_classifier", None)):
        raise ConfigError(
            f"finetune_head needs a co-submodel with timm's head API (get_classifier()), but {spec.name!r} builds a "  # type: ignore[union-attr]
            f"{type(network).__name__} without it: set finetune_head: false, or give the network timm's head API "
            "(dcccl.backbones.ClassifierHeadMixin)")


def check_private_co_submodel(settings: PipelineSettings, kept: Sequence[Path],
                              resolved: Sequence[tuple[StageCall, ResolvedStage]], data: DataDescription) -> None:
    """With ``privacy``, refuse before anything trains a co-submodel DP-SGD cannot train (batch norm), or a missing
    Opacus.

    Raises:
        ConfigError: Opacus is missing, or the co-submodel has layers that mix a batch's samples.
    """
    if settings.privacy is None:
        return
    require_opacus()
    run = settings.run
    network = _network(run.initial_co_submodel if run.initial_co_submodel in kept else None, "co_submodel",
                       _resolved_spec(resolved, "cloud_round", "co_backbone"), data, device="meta")
    if network is not None:
        check_trainable(network, "the run (privacy is set)")


def check_before_running(settings: PipelineSettings, plan: Sequence[Any], decisions: Sequence[Decision],
                         runner: StageRunner, data: DataDescription, refusals: Sequence[DCCCLError] = ()) -> None:
    """Every check of a plan before it runs (see the module docstring); writes nothing.

    The stage configs and backbones are checked first, then the coordinator's ``refusals`` (a changed config or a
    corrupted artifact of the run directory) are raised, then what meets the run directory.

    Raises:
        BoundaryViolation, BackboneNotFoundError, WeightsFileError, ConfigChangedError, IntegrityError, ExportError,
            DeviceBudgetExceeded, ConfigError: The first check that fails.
    """
    resolved = resolve_stages(plan, runner)
    check_boundary(resolved, settings.run.root)
    for _, stage in resolved:
        for spec in backbone_specs(stage.model_args):
            check_backbone(spec["name"], spec["checkpoint_path"], bool(spec.get("pretrained", False)))
    if refusals:
        raise refusals[0]
    kept = kept_artifacts(decisions)
    check_kept_exports(kept, data, settings.run.root)
    check_head_api(settings, resolved, data)
    check_private_co_submodel(settings, kept, resolved, data)
    check_budget_before_running(settings, kept, resolved, data)
