"""The plan of a DC-CCL run: settings in, the ordered list of steps out. Pure: it reads no file and runs nothing.

cloud -> distill -> per round: cloud side, every reporting device, fusion, (head fine-tuning), evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal, Optional

from dcccl.artifacts.run_dir import RunDirectory
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.federated.attacks import Attack
from dcccl.federated.class_split import DataPartition
from dcccl.federated.compression import Compression
from dcccl.federated.privacy import DifferentialPrivacy
from dcccl.pipeline.config_snapshot import snapshot
from dcccl.pipeline.fusion import FusionStep
from dcccl.pipeline.settings import PipelineSettings, RestartPoint
from dcccl.pipeline.stages import StageArguments
from dcccl.pipeline.steps import DeviceTask, SecureSum, StageCall, Step

Plan = list[Step]


@dataclass(frozen=True)
class Reused:
    """Artifacts another run already made that this plan takes instead of making its own (compared methods).

    Args:
        cloud_submodel: Take this cloud submodel instead of training one.
        control_model: Take this control model instead of distilling one.
        initial_co_submodel: Start round 1 from this co-submodel instead of building a fresh one.
    """

    cloud_submodel: Optional[Path] = None
    control_model: Optional[Path] = None
    initial_co_submodel: Optional[Path] = None


@dataclass(frozen=True)
class CloudArguments(StageArguments):
    """What the plan gives the ``cloud`` stage: where to export the cloud submodel (and, with ``split``, its part)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"backbone"})
    export_path: Path
    backbone: Optional[BackboneSpec] = None


@dataclass(frozen=True)
class DistillArguments(StageArguments):
    """What the plan gives the ``distill`` stage: the cloud submodel to distil, where to export the control model."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"backbone"})
    cloud_submodel: Path
    export_path: Path
    backbone: Optional[BackboneSpec] = None


@dataclass(frozen=True)
class CloudRoundArguments(StageArguments):
    """What the plan gives the ``cloud_round`` stage: its guide, the round's start (``None``: build the initial
    co-submodel and export it to ``initial_export_path``) and where the cloud's copy goes."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"co_backbone"})
    guide: Optional[Path]
    co_submodel: Optional[Path]
    initial_export_path: Optional[Path]
    export_path: Path
    co_backbone: Optional[BackboneSpec] = None


@dataclass(frozen=True)
class DeviceArguments(StageArguments):
    """What the plan gives the ``device`` stage: the control model (``None``: unguided), the template's start (each
    device is reset to its own), no export path (each copy goes to its task's file), and the settings a stage config
    may not weaken."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"report_class_counts", "privacy", "compression", "attack"})
    control_model: Optional[Path]
    co_submodel: Path
    export_path: None = None
    report_class_counts: bool = False
    privacy: Optional[DifferentialPrivacy] = None
    compression: Optional[Compression] = None
    attack: Optional[Attack] = None


@dataclass(frozen=True)
class HeadArguments(StageArguments):
    """What the plan gives the ``head`` stage: the fused co-submodel, the cloud submodel, where the result goes."""

    co_submodel: Path
    cloud_submodel: Path
    export_path: Path


@dataclass(frozen=True)
class EvaluateArguments(StageArguments):
    """What the plan gives the ``evaluate`` stage: the served model's parts and where its metrics go."""

    cloud_submodel: Optional[Path]
    co_submodel: Path
    metrics_path: Path


class PlanBuilder:
    """Makes the stage calls of one run: config files, trainer options, split and fleet arguments, stage_args.

    Args:
        settings: The run's settings.
        run: Its run directory.
    """

    def __init__(self, settings: PipelineSettings, run: RunDirectory) -> None:
        self.settings = settings
        self.run = run

    def call(self, stage: str, arguments: StageArguments, outputs: tuple[Path, ...], label: str,
             restart_point: RestartPoint, command: Literal["fit", "test"] = "fit", round_index: int = 0,
             inputs: tuple[Path, ...] = (), partition: Optional[DataPartition] = None,
             config_stage: Optional[str] = None, devices: tuple[DeviceTask, ...] = (),
             work_dir: Optional[Path] = None) -> StageCall:
        """A stage call with this run's data config, trainer options and extra arguments.

        ``config_stage`` names the stage config to use when it is not the stage's own (``fedavg_client``); a device
        stage trains ``devices`` and keeps its logs in ``work_dir`` (default: the folder of the first output).
        """
        settings = self.settings
        config_name = config_stage or stage
        if config_name not in settings.stages:
            raise ConfigError(f"the pipeline config names no stage config for {config_name}: add stages.{config_name} "
                              "(see configs/quickstart.yaml)")
        config_files = [snapshot(settings.stages[config_name])]  # what is checked is what runs
        if settings.data is not None:
            config_files.insert(0, snapshot(settings.data))
        work_dir = work_dir if work_dir is not None else outputs[0].parent
        trainer_args = {**settings.trainer, "default_root_dir": str(work_dir)}
        data_args = settings.fleet.data_arguments()
        return StageCall(
            label=label, restart_point=restart_point, outputs=outputs, inputs=inputs, round_index=round_index,
            stage=stage, command=command, config_files=tuple(config_files), model_args=arguments.model_args(),
            trainer_args=trainer_args, data_args=data_args, seed=settings.seed_everything, work_dir=work_dir,
            partition=partition,
            extra_args=tuple(settings.stage_args.get(stage, [])),
            group=settings.name, tracking_dir=self.run.root, devices=devices,
        )

    def split_part(self, part: Literal["cloud", "co"]) -> Optional[BackboneSpec]:
        """The backbone of one part of the split base model (``None`` without ``split``)."""
        return None if self.settings.split is None else self.settings.split.part(part)

    def devices(self, tasks: list[DeviceTask], control_model: Optional[Path], label: str, round_index: int,
                report_class_counts: bool) -> StageCall:
        """One device stage call that trains every task's device, each from its own start, inside one ``fit``.

        Args:
            tasks: The devices, their starts, their copies and what crosses the wire for each.
            control_model: The control model every device trains under (``None``: unguided).
            label: Human-readable name for progress messages.
            round_index: The round the devices train in.
            report_class_counts: Whether each copy records its samples per class (the rule fuses class by class).
        """
        starts = tuple(dict.fromkeys(task.start for task in tasks))
        arguments = DeviceArguments(control_model, starts[0], report_class_counts=report_class_counts,
                                    privacy=self.settings.device_privacy, compression=self.settings.compression,
                                    attack=self.settings.attack)
        inputs = tuple(p for p in (control_model, *starts) if p is not None)
        secure = self.settings.secure_aggregation
        outputs = (self.run.secure_sum(round_index),) if secure is not None else tuple(task.export for task in tasks)
        call = self.call("device", arguments, outputs, label, "rounds", round_index=round_index, inputs=inputs,
                         partition="device", devices=tuple(tasks), work_dir=self.run.round_dir(round_index) / "devices")
        if secure is None:
            return call
        return replace(call, secure_sum=SecureSum(outputs[0], secure, self.settings.rule.secure_weights_by_samples))

    def evaluation(self, co_submodel: Path, metrics: Path, label: str, restart_point: RestartPoint,
                   cloud_submodel: Optional[Path], round_index: int = 0) -> StageCall:
        """Evaluate the served model made of ``co_submodel`` (plus ``cloud_submodel``, if served)."""
        inputs = (co_submodel,) if cloud_submodel is None else (cloud_submodel, co_submodel)
        return self.call("evaluate", EvaluateArguments(cloud_submodel, co_submodel, metrics), (metrics,), label,
                         restart_point, command="test", round_index=round_index, inputs=inputs)

class FleetHistory:
    """What a plan remembers of each device from round to round: whether it holds the control model already, and the
    last round it took part in (where the state it keeps comes from)."""

    def __init__(self) -> None:
        self.has_control: set[int] = set()
        self.last_round: dict[int, int] = {}

    def tasks(self, settings: PipelineSettings, run: RunDirectory, round_index: int, reporting: list[int],
              device_start: Path, control: Optional[Path]) -> list[DeviceTask]:
        """The round's device tasks: each reporting device's start, copy, and what crosses the wire for it (the
        control model only the first time the device takes part)."""
        tasks = []
        for device in reporting:
            sends_control = control is not None and device not in self.has_control
            self.has_control.add(device)
            downlink = tuple(p for p in (control if sends_control else None, device_start) if p is not None)
            copy = run.device_copy(round_index, device)
            state_in = state_out = None
            if settings.keeps_device_state:
                last = self.last_round.get(device)
                state_in = run.device_state(last, device) if last is not None else None
                state_out = run.device_state(round_index, device)
            self.last_round[device] = round_index
            # With secure aggregation the cloud sees only the round's masked sum.
            uplink = run.secure_sum(round_index) if settings.secure_aggregation is not None else copy
            tasks.append(DeviceTask(device, device_start, copy, downlink, (uplink,), state_in, state_out))
        return tasks


def dcccl_plan(settings: PipelineSettings, run: Optional[RunDirectory] = None, reused: Reused = Reused(),
               cloud_round_stage: str = "cloud_round") -> Plan:
    """The steps of a DC-CCL run (or of a variant of it: the guides and what is served follow ``settings``).

    Args:
        settings: The run's settings.
        run: Its run directory (default: the settings' own).
        reused: Artifacts of another run to take instead of making them here.
        cloud_round_stage: Which stage config trains the cloud's copy of the co-submodel.
    """
    run = run if run is not None else settings.run
    build = PlanBuilder(settings, run)
    steps: Plan = []
    cloud_submodel = reused.cloud_submodel or run.cloud_submodel
    if settings.needs_cloud_submodel and reused.cloud_submodel is None:
        steps.append(build.call("cloud", CloudArguments(run.cloud_submodel, build.split_part("cloud")),
                                (run.cloud_submodel,), "cloud submodel", "cloud", partition="cloud"))
    control_model = reused.control_model or run.control_model
    if settings.needs_control_model and reused.control_model is None:
        steps.append(build.call("distill", DistillArguments(cloud_submodel, run.control_model, build.split_part("co")),
                                (run.control_model,), "control model", "distill", inputs=(cloud_submodel,),
                                partition="cloud"))
    guide = {"cloud_submodel": cloud_submodel, "control_model": control_model}.get(settings.cloud_round_guide)
    initial = reused.initial_co_submodel or run.initial_co_submodel
    served_cloud = cloud_submodel if settings.serve_cloud_submodel else None
    control = control_model if settings.device_guide == "control_model" else None
    fleet = FleetHistory()
    for r in range(1, settings.rounds + 1):
        tag = f"round {r}/{settings.rounds}"
        start = initial if r == 1 else round_result(settings, run, r - 1)
        builds_initial = r == 1 and reused.initial_co_submodel is None
        cloud_round = CloudRoundArguments(guide, None if builds_initial else start,
                                          run.initial_co_submodel if builds_initial else None, run.cloud_copy(r),
                                          build.split_part("co"))
        outputs = (run.cloud_copy(r), run.initial_co_submodel) if builds_initial else (run.cloud_copy(r),)
        steps.append(build.call(
            "cloud_round", cloud_round, outputs, f"{tag}: cloud side", "rounds", round_index=r,
            inputs=tuple(p for p in (guide, None if builds_initial else start) if p is not None),
            partition="cloud", config_stage=cloud_round_stage))
        reporting = settings.fleet.reporting(settings.seed_everything, r)
        device_start = device_start_of(settings, run, r, initial)
        tasks = fleet.tasks(settings, run, r, reporting, device_start, control)
        if tasks:
            steps.append(build.devices(tasks, control, f"{tag}: {devices_label(reporting)}", r,
                                       settings.rule.needs_class_counts))
        steps.append(fusion_step(settings, run, r, initial))
        if settings.finetune_head:
            head = HeadArguments(run.fused_co_submodel(r), cloud_submodel, run.finetuned_co_submodel(r))
            steps.append(build.call(
                "head", head, (run.finetuned_co_submodel(r),), f"{tag}: head fine-tuning", "rounds", round_index=r,
                inputs=(run.fused_co_submodel(r), cloud_submodel), partition="cloud"))
        steps.append(build.evaluation(round_result(settings, run, r), run.round_metrics(r), f"{tag}: evaluation",
                                      "rounds", served_cloud, round_index=r))
    return steps


def devices_label(devices: list[int]) -> str:
    """``device 3`` or ``5 devices (1, 4, 7, 8, 9)`` (at most ten numbers shown)."""
    if len(devices) == 1:
        return f"device {devices[0]}"
    shown = ", ".join(str(device) for device in devices[:10]) + (", ..." if len(devices) > 10 else "")
    return f"{len(devices)} devices ({shown})"


def round_result(settings: PipelineSettings, run: RunDirectory, round_index: int) -> Path:
    """The co-submodel a round ends with (and the next starts from): fused, then fine-tuned when configured."""
    return run.finetuned_co_submodel(round_index) if settings.finetune_head else run.fused_co_submodel(round_index)


def device_start_of(settings: PipelineSettings, run: RunDirectory, round_index: int, initial: Path) -> Path:
    """The co-submodel the devices start from in a round: the round's start, or (sequential rounds) the cloud's copy."""
    if settings.round_order == "sequential":
        return run.cloud_copy(round_index)
    return initial if round_index == 1 else round_result(settings, run, round_index - 1)


def fusion_step(settings: PipelineSettings, run: RunDirectory, round_index: int, initial: Path) -> FusionStep:
    """The fusion of round ``round_index``: the cloud's copy and the device copies the aggregation rule chooses."""
    rule = settings.rule
    fused = rule.fused_copies(settings.fleet, settings.seed_everything, round_index)

    copies = tuple(run.device_copy(r, device) for device, r in fused)
    share_of: tuple[tuple[int, ...], ...] = ()
    if settings.secure_aggregation is not None and fused:  # the devices' weighted mean, as one copy
        copies = (run.secure_sum(round_index),)
        share_of = (tuple(device for device, _ in fused),)
        fused = [(-1, round_index)]
    bases = tuple(None if r == round_index else device_start_of(settings, run, r, initial) for _, r in fused)
    sent = tuple(device_start_of(settings, run, r, initial) for _, r in fused)  # what each copy started from
    stale = any(base is not None for base in bases)
    onto = device_start_of(settings, run, round_index, initial) if stale or rule.needs_device_start else None
    inputs = [run.cloud_copy(round_index), *copies, *sent, *((onto,) if onto is not None else ())]
    outputs: tuple[Path, ...] = (run.fused_co_submodel(round_index),)
    if copies:
        outputs += (run.reply_verdicts(round_index),)
    start = state_in = state_out = None
    if rule.keeps_server_state:  # a server optimiser: its step starts from the round's start, with its kept state
        start = initial if round_index == 1 else round_result(settings, run, round_index - 1)
        state_in = run.server_state(round_index - 1) if round_index > 1 else None
        state_out = run.server_state(round_index)
        inputs += [start, *((state_in,) if state_in is not None else ())]
        outputs += (state_out,)
    return FusionStep(
        label=f"round {round_index}/{settings.rounds}: fusion of the cloud copy and {len(copies)} device copies",
        restart_point="rounds", outputs=outputs, inputs=tuple(dict.fromkeys(inputs)),
        round_index=round_index, rule=rule, cloud_copy=run.cloud_copy(round_index), device_copies=copies,
        device_bases=bases, rebase_onto=onto, round_start=start, state_in=state_in, state_out=state_out,
        device_ids=tuple(device for device, _ in fused), device_rounds=tuple(r for _, r in fused),
        device_starts=sent, reply_verdicts=run.reply_verdicts(round_index) if copies else None, share_of=share_of)
