"""The steps of a plan: stage calls (a LightningModule run through a stage runner) and local steps (plain functions
the coordinator calls itself, such as fusion).

A step is fully described when the plan makes it: what it reads (``inputs``), what it writes (``outputs``), where it
belongs (``restart_point``, ``round_index``). The coordinator never changes a step; what it decides (skip, resume)
it keeps to itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from dcccl.artifacts.manifest import PRESENTATION_OPTIONS
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.class_split import DataPartition
from dcccl.federated.secure_aggregation import SecureAggregation
from dcccl.pipeline.settings import RestartPoint


@dataclass(frozen=True)
class Step:
    """What every step has.

    Args:
        label: Human-readable name for progress messages.
        restart_point: The restart point the step belongs to (``--from_stage``).
        outputs: The artifacts the step must leave behind; all present means done.
        inputs: The artifacts the step reads (a changed input makes it run again).
        round_index: The round the step belongs to (0 outside the rounds).
    """

    label: str
    restart_point: RestartPoint
    outputs: tuple[Path, ...]
    inputs: tuple[Path, ...]
    round_index: int

    def describe(self) -> dict[str, Any]:
        """Everything besides the inputs' bytes that decides what the step produces (its config fingerprint)."""
        raise NotImplementedError


@dataclass(frozen=True)
class DeviceTask:
    """One device's part of a device stage call: what it starts from, where its copy goes, what crosses the wire.

    Args:
        device: The device (0-based).
        start: The co-submodel it starts from.
        export: Where its trained copy is written.
        downlink: What the cloud sends it before it trains (the control model only the first time it takes part).
        uplink: What it sends back (its copy; its sample count, and its samples per class when the rule asks for
            them, are counted with it).
        state_in: What the device kept from the last round it took part in (its privacy accountant's history, its
            compression residual); ``None``: nothing (its first round, or nothing to keep). It never leaves the device.
        state_out: Where the device keeps that state after this round (``None``: it keeps none).
    """

    device: int
    start: Path
    export: Path
    downlink: tuple[Path, ...] = ()
    uplink: tuple[Path, ...] = ()
    state_in: Optional[Path] = None
    state_out: Optional[Path] = None

    def describe(self) -> dict[str, Any]:
        """The device and the two artifact paths (what decides what the task produces)."""
        return {"device": self.device, "start": str(self.start), "export": str(self.export)}


@dataclass(frozen=True)
class SecureSum:
    """How a device call's copies reach the cloud under secure aggregation: only as their weighted mean.

    Args:
        path: Where the mean copy goes (with the devices' total sample count).
        settings: The SecAgg+ protocol's settings.
        weight_by_samples: Whether each device's weight is its sample count (else one).
    """

    path: Path
    settings: SecureAggregation
    weight_by_samples: bool = True


@dataclass(frozen=True)
class StageCall(Step):
    """One stage run as the plan asks for it: a LightningModule run through ``dcccl fit``/``test``'s parser.

    Args:
        label: Human-readable name for progress messages.
        restart_point: The restart point the call belongs to.
        outputs: The artifacts the stage must leave behind.
        inputs: The artifacts the stage reads.
        round_index: The round the call belongs to (0 outside the rounds).
        stage: Which stage.
        command: The LightningCLI subcommand (``fit`` trains, ``test`` evaluates).
        config_files: Config files, applied in order (later ones win).
        model_args: Init arguments of the stage module, mostly artifact paths.
        trainer_args: Trainer options for this run.
        data_args: Init arguments of the DataModule (the fleet's partition, the device's index).
        seed: Seed for training and for the data split.
        work_dir: Where the stage keeps its config, logs and checkpoints.
        partition: The training samples the stage may see (``None``: it trains on nothing).
        extra_args: Raw command-line arguments appended last (the pipeline's ``stage_args``; they win).
        group: The pipeline run the call belongs to (its name).
        tracking_dir: Where the call's W&B run lands (the run directory; ``None``: its ``work_dir``). TensorBoard
            and CSV logs go to its ``work_dir``.
        devices: For a device stage, the devices it trains, one after another inside one ``fit`` (a round's
            reporting devices; each on its own samples only, each copy written to its own file).
        secure_sum: With secure aggregation: how the devices' weighted mean copy is made and where it goes; the
            cloud receives nothing else of them (their own copies stay on the devices).
    """

    stage: str = "cloud"
    command: Literal["fit", "test"] = "fit"
    config_files: tuple[Path, ...] = ()
    model_args: dict[str, Any] = field(default_factory=dict)
    trainer_args: dict[str, Any] = field(default_factory=dict)
    data_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    work_dir: Path = Path(".")
    partition: Optional[DataPartition] = None
    extra_args: tuple[str, ...] = ()
    group: str = ""
    tracking_dir: Optional[Path] = None
    devices: tuple[DeviceTask, ...] = ()
    secure_sum: Optional[SecureSum] = None

    @property
    def last_checkpoint(self) -> Path:
        """Where the stage's last checkpoint is kept."""
        return RunDirectory.last_checkpoint(self.work_dir)

    @property
    def run_name(self) -> str:
        """Name of the call's tracking run: pipeline, round and device, e.g. ``quickstart/round2/device3``."""
        parts = [self.group] if self.group else []
        if self.round_index:
            parts.append(f"round{self.round_index}")
        parts.append("devices" if self.devices else self.stage)
        return "/".join(parts)

    def describe(self) -> dict[str, Any]:
        """Stage, command, config files (by content), arguments, the trainer options that change results, seed."""
        return {
            "stage": self.stage,
            "command": self.command,
            "config_files": [Path(path).read_text() for path in self.config_files],
            "model_args": dict(sorted(self.model_args.items())),
            "trainer_args": {k: v for k, v in sorted(self.trainer_args.items()) if k not in PRESENTATION_OPTIONS},
            "data_args": self.data_args,
            "seed": self.seed,
            "extra_args": list(self.extra_args),
            **({"devices": [task.describe() for task in self.devices]} if self.devices else {}),
            **({"secure_sum": {"path": str(self.secure_sum.path), **self.secure_sum.settings.to_dict(),
                               "weight_by_samples": self.secure_sum.weight_by_samples}}
               if self.secure_sum is not None else {}),
        }


class LocalStep(Step, ABC):
    """A step the coordinator runs itself, as a plain function (global rank zero writes, every rank waits)."""

    @abstractmethod
    def run(self) -> None:
        """Produce the outputs."""
