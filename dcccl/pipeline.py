"""The pipeline coordinator: the order of the stages, what each receives and produces, and what to skip.

The coordinator knows nothing of Lightning. It plans :class:`StageCall` objects (stage, config files,
artifact paths in, artifact paths out) and hands each to a :data:`StageRunner`; ``cli.py`` provides the
runner that executes a call through the same LightningCLI parser users run by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from dcccl.atomic import atomic_write_json
from dcccl.budget import DeviceBudget, check_device_budget
from dcccl.exports import load_network
from dcccl.fleet import FleetSpec
from dcccl.ledger import Ledger, LedgerViolation
from dcccl.manifest import ConfigChangedError, Manifest, config_fingerprint
from dcccl.plots import plot_accuracy_per_round, plot_confusion_matrix
from dcccl.ranks import is_global_zero
from dcccl.run_dir import RunDirectory
from dcccl.split import SplitSpec
from dcccl.tracking import with_save_dirs

log = logging.getLogger("dcccl")

StageName = Literal["cloud", "distill", "cloud_round", "device", "fusion", "evaluate", "centralized"]
RestartPoint = Literal["cloud", "distill", "rounds"]
RESTART_ORDER: tuple[RestartPoint, ...] = ("cloud", "distill", "rounds")
Guide = Literal["cloud_submodel", "control_model", "none"]
DeviceGuide = Literal["control_model", "none"]


@dataclass
class StageCall:
    """One stage run as the coordinator asks for it.

    Args:
        stage: Which stage.
        command: The LightningCLI subcommand (``fit`` trains, ``test`` evaluates).
        config_files: Config files, applied in order (later ones win).
        model_args: Init arguments of the stage module, mostly artifact paths.
        trainer_args: Trainer options for this run.
        seed: Seed for training and for the data split.
        work_dir: Where the stage keeps its config, logs and checkpoints.
        outputs: The artifacts the stage must leave behind; all present means done.
        extra_args: Raw command-line arguments appended last (they win over everything).
        label: Human-readable name for progress messages.
        data_args: Init arguments of the DataModule (the fleet's partition, the device's index).
        device: For a device stage, the device it runs for.
        round_index: The round the call belongs to (0 outside the rounds).
        group: The pipeline run the call belongs to (its name).
        fingerprint: Hash of everything that decides what the call produces (set by the coordinator).
        resume: Continue from the stage's last checkpoint (set by the coordinator for an interrupted stage).
    """

    stage: StageName
    command: Literal["fit", "test"]
    config_files: list[Path]
    model_args: dict[str, Any]
    trainer_args: dict[str, Any]
    seed: int
    work_dir: Path
    outputs: tuple[Path, ...]
    extra_args: list[str] = field(default_factory=list)
    label: str = ""
    data_args: dict[str, Any] = field(default_factory=dict)
    device: Optional[int] = None
    round_index: int = 0
    group: str = ""
    fingerprint: str = ""
    resume: bool = False

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
        parts.append(self.stage if self.device is None else f"device{self.device}")
        return "/".join(parts)


StageRunner = Callable[[StageCall], None]


class StageFailedError(RuntimeError):
    """A stage finished without producing the artifacts it promised."""


@dataclass
class StageConfigs:
    """The config file of each stage (the same files run each stage alone with ``dcccl fit``/``test``).

    Args:
        cloud: Trains the cloud submodel.
        distill: Distils the control model from the cloud submodel.
        cloud_round: Trains the cloud's copy of the co-submodel in each round.
        device: Trains a device's copy of the co-submodel in each round.
        fusion: Fuses the copies of the co-submodel.
        evaluate: Evaluates the served model.
        centralized: Trains the whole model on pooled samples (only ``dcccl compare`` uses it).
        fedavg_client: Trains the cloud's copy of the small model as a plain FedAvg client (``dcccl compare``).
    """

    cloud: Path
    distill: Path
    cloud_round: Path
    device: Path
    fusion: Path
    evaluate: Path
    centralized: Optional[Path] = None
    fedavg_client: Optional[Path] = None


class Pipeline:
    """Runs DC-CCL end to end: cloud -> distill -> rounds of (cloud side, devices, fusion, evaluation).

    Re-running with the same run directory skips every stage whose artifacts are present; once one stage
    runs, every later stage runs too, since its inputs changed.

    Args:
        stages: Config file of each stage.
        data: Config file with the ``data`` section shared by all stages (default: the bundled MNIST digits).
            In a config file, relative paths of config files are relative to that file.
        name: Run name; the run directory defaults to ``runs/<name>``.
        run_dir: Run directory (overrides ``runs/<name>``), relative to the working directory.
        rounds: Number of device-cloud rounds (at least 1).
        seed_everything: Seed of the whole run: data split and training of every stage.
        cloud_round_guide: Which model guides the cloud's copy of the co-submodel: the cloud submodel
            (default, as in the paper's code), the control model, or none (baselines).
        device_guide: Whether the control model guides the devices (``none``: the ablation without it).
        serve_cloud_submodel: Serve ``f + h`` (default) or the co-submodel alone (small-model baselines).
        fleet: Many devices: their data partition, sampling, availability and aggregation (default: one device
            that always reports).
        device_budget: Limits the on-device part (control model + co-submodel) must fit; checked before the
            first device trains, and the run is refused if it does not fit.
        split: Build the submodels by splitting one base model vertically instead of taking each stage's own
            backbone: the cloud submodel is the large group, the co-submodel (and the control model, which
            is distilled afterwards) the small group, all initialised from the base model's weights.
        trainer: Trainer options applied to every stage (e.g. ``{max_epochs: 1, accelerator: cpu}``).
        stage_args: Extra command-line arguments per stage name, e.g. ``{cloud: ["--model.init_args.lr=0.01"]}``.
        force: Re-run every stage even if its artifacts exist.
        from_stage: Re-run from this point on (``cloud``, ``distill`` or ``rounds``), keep what comes before.
        rerun_changed: When the config of a finished stage changed since it ran, re-run from that stage on
            instead of refusing.
    """

    def __init__(
        self,
        stages: StageConfigs,
        data: Optional[Path] = None,
        name: str = "dcccl",
        run_dir: Optional[str] = None,
        rounds: int = 3,
        seed_everything: int = 0,
        cloud_round_guide: Guide = "cloud_submodel",
        device_guide: DeviceGuide = "control_model",
        serve_cloud_submodel: bool = True,
        fleet: Optional[FleetSpec] = None,
        device_budget: Optional[DeviceBudget] = None,
        split: Optional[SplitSpec] = None,
        trainer: Optional[dict[str, Any]] = None,
        stage_args: Optional[dict[str, list[str]]] = None,
        force: bool = False,
        from_stage: Optional[RestartPoint] = None,
        rerun_changed: bool = False,
    ) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        unknown = set(stage_args or {}) - set(StageConfigs.__dataclass_fields__)
        if unknown:
            raise ValueError(f"stage_args names unknown stages {sorted(unknown)}")
        for config in [*vars(stages).values(), *([data] if data is not None else [])]:
            if config is not None and not Path(config).is_file():
                raise FileNotFoundError(f"config file not found: {config}")
        self.stages = stages
        self.data = data
        self.name = name
        self.run = RunDirectory(run_dir if run_dir is not None else Path("runs") / name)
        self.rounds = rounds
        self.seed = seed_everything
        self.cloud_round_guide = cloud_round_guide
        self.device_guide = device_guide
        self.serve_cloud_submodel = serve_cloud_submodel
        self.split = split
        self.fleet = fleet if fleet is not None else FleetSpec()
        self.device_budget = device_budget
        self.sample_shape: Optional[tuple[int, ...]] = None  # set by the runner's owner for the budget gate
        self.num_classes: Optional[int] = None
        self.ledger = Ledger()
        self.trainer = dict(trainer or {})
        self.stage_args = {key: list(value) for key, value in (stage_args or {}).items()}
        self.restart_from: Optional[RestartPoint] = "cloud" if force else from_stage
        self.rerun_changed = rerun_changed
        self._manifest: Optional[Manifest] = None

    def _call(self, stage: StageName, command: Literal["fit", "test"], model_args: dict[str, Any],
              outputs: tuple[Path, ...], label: str, round_index: int = 0) -> StageCall:
        config_files = [Path(getattr(self.stages, stage))]
        if self.data is not None:
            config_files.insert(0, Path(self.data))
        work_dir = outputs[0].parent
        trainer_args = {**self.trainer, "default_root_dir": str(work_dir)}
        if trainer_args.get("logger") not in (None, True, False):
            # W&B runs land in the run directory, TensorBoard and CSV logs in the stage's own directory.
            trainer_args["logger"] = with_save_dirs(trainer_args["logger"], self.run.root, work_dir)
        return StageCall(
            stage=stage,
            command=command,
            config_files=config_files,
            model_args=model_args,
            trainer_args=trainer_args,
            seed=self.seed,
            work_dir=work_dir,
            outputs=outputs,
            extra_args=self.split_arguments(stage) + list(self.stage_args.get(stage, [])),
            label=label,
            data_args=self.fleet_data_arguments(),
            round_index=round_index,
            group=self.name,
        )

    def fleet_data_arguments(self) -> dict[str, Any]:
        """DataModule arguments that divide the device-side samples among the fleet (none for one device)."""
        if self.fleet.num_devices == 1:
            return {}
        return {"num_devices": self.fleet.num_devices, "device_partitioner": self.fleet.partitioner,
                "dirichlet_alpha": self.fleet.dirichlet_alpha, "classes_per_device": self.fleet.classes_per_device}

    @property
    def needs_control_model(self) -> bool:
        """Whether any stage uses the control model."""
        return self.device_guide == "control_model" or self.cloud_round_guide == "control_model"

    @property
    def needs_cloud_submodel(self) -> bool:
        """Whether any stage uses the cloud submodel."""
        return self.serve_cloud_submodel or self.cloud_round_guide == "cloud_submodel" or self.needs_control_model

    def split_arguments(self, stage: StageName) -> list[str]:
        """Command-line arguments that give ``stage`` its part of the split base model (none without ``split``)."""
        if self.split is None:
            return []
        parts = {"cloud": {"backbone": "cloud"}, "distill": {"backbone": "co"}, "cloud_round": {"co_backbone": "co"},
                 "centralized": {"backbone": "cloud", "co_backbone": "co"}}.get(stage, {})
        return [f"--model.init_args.{argument}={json.dumps(self.split.part(part).to_dict())}"  # type: ignore[arg-type]
                for argument, part in parts.items()]

    def plan(self) -> Iterator[tuple[RestartPoint, StageCall]]:
        """The stage calls in order, each with the restart point it belongs to."""
        run = self.run
        if self.needs_cloud_submodel:
            yield "cloud", self._call("cloud", "fit", {"export_path": str(run.cloud_submodel)},
                                      (run.cloud_submodel,), "cloud submodel")
        if self.needs_control_model:
            yield "distill", self._call("distill", "fit", {"cloud_submodel": str(run.cloud_submodel),
                                                           "export_path": str(run.control_model)},
                                        (run.control_model,), "control model")
        guide = {"cloud_submodel": run.cloud_submodel, "control_model": run.control_model}.get(self.cloud_round_guide)
        cloud_submodel = str(run.cloud_submodel) if self.needs_cloud_submodel else None
        for r in range(1, self.rounds + 1):
            tag = f"round {r}/{self.rounds}"
            first = r == 1
            cloud_outputs = (run.cloud_copy(r), run.initial_co_submodel) if first else (run.cloud_copy(r),)
            yield "rounds", self._call("cloud_round", "fit", {
                "guide": None if guide is None else str(guide),
                "co_submodel": None if first else str(run.start_co_submodel(r)),
                "initial_export_path": str(run.initial_co_submodel) if first else None,
                "export_path": str(run.cloud_copy(r)),
            }, cloud_outputs, f"{tag}: cloud side", r)
            reporting = self.fleet.reporting(self.seed, r)
            for position, device in enumerate(reporting, start=1):
                call = self._call("device", "fit", {
                    "control_model": str(run.control_model) if self.device_guide == "control_model" else None,
                    "co_submodel": str(run.start_co_submodel(r)),
                    "export_path": str(run.device_copy(r, device)),
                }, (run.device_copy(r, device),), f"{tag}: device {device} ({position}/{len(reporting)})", r)
                if self.fleet.num_devices > 1:
                    call.data_args["device_index"] = device
                call.device = device
                yield "rounds", call
            fused = self.fleet.fused_copies(self.seed, r)
            stale = any(round_index != r for _, round_index in fused)
            yield "rounds", self._call("fusion", "fit", {
                "cloud_copy": str(run.cloud_copy(r)),
                "device_copies": [str(run.device_copy(round_index, device)) for device, round_index in fused],
                # Latest-update averaging: a copy from an earlier round contributes its update, re-applied here.
                "device_bases": [None if round_index == r else str(run.start_co_submodel(round_index))
                                 for _, round_index in fused] if stale else None,
                "rebase_onto": str(run.start_co_submodel(r)) if stale else None,
                "cloud_submodel": cloud_submodel,
                "export_path": str(run.fused_co_submodel(r)),
            }, (run.fused_co_submodel(r),), f"{tag}: fusion of the cloud copy and {len(fused)} device copies", r)
            evaluation = self.evaluation_call(run.fused_co_submodel(r), run.round_metrics(r), f"{tag}: evaluation")
            evaluation.round_index = r
            yield "rounds", evaluation

    def evaluation_call(self, co_submodel: Path, metrics: Path, label: str) -> StageCall:
        """Evaluate the served model made of ``co_submodel`` (plus the cloud submodel, if served)."""
        return self._call("evaluate", "test", {
            "cloud_submodel": str(self.run.cloud_submodel) if self.serve_cloud_submodel else None,
            "co_submodel": str(co_submodel),
            "metrics_path": str(metrics),
        }, (metrics,), label)

    def evaluation_paths(self) -> list[Path]:
        """The metrics files of the evaluations, in order (one per round)."""
        return [self.run.round_metrics(r) for r in range(1, self.rounds + 1)]

    def execute(self, runner: StageRunner) -> dict[str, Any]:
        """Run (or skip) every stage with ``runner``, write ``metrics.json`` and return its content.

        A stage whose artifacts exist is skipped once the manifest confirms them (same bytes, same config).
        A stage that was interrupted continues from its last checkpoint; one that must run again because the
        user asked, or because an earlier stage ran again, starts from scratch.
        """
        rerun, budget_checked = False, False
        plan = list(self.plan())
        self.ledger = Ledger()
        manifest = self.manifest
        if is_global_zero():  # what a kill left mid-write under a temporary name (never under a final name)
            for stale in self.run.root.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
        run_started = time.perf_counter()
        for step, (restart_point, call) in enumerate(plan, start=1):
            progress = f"[dcccl {self.name} {step}/{len(plan)}] {call.label}"
            call.fingerprint = self.fingerprint(call)
            fresh = rerun or self._forced(restart_point)
            if not fresh and all(path.is_file() for path in call.outputs):
                if self._finished_as_configured(call, manifest):
                    log.info("%s: done already, skipped (%s)", progress, call.outputs[0])
                    self._record_transfers(call)
                    continue
                log.info("%s: its config changed since it ran; running it and every later stage again", progress)
                fresh = True
            rerun = True
            if call.stage == "device":
                self._check_device_call(call, first=not budget_checked)
                budget_checked = True
            call.resume = self._prepare_stage_dir(call, fresh)
            resumed = f" (resuming from {call.last_checkpoint})" if call.resume else ""
            log.info("%s: running %s %s%s", progress, call.command, call.config_files[-1], resumed)
            started = time.perf_counter()
            runner(call)
            log.info("%s: finished in %.1f s (run so far %.0f s)", progress, time.perf_counter() - started,
                     time.perf_counter() - run_started)
            missing = [str(path) for path in call.outputs if not path.is_file()]
            if missing:
                raise StageFailedError(f"stage {call.label!r} finished but did not write {', '.join(missing)}")
            if is_global_zero():
                manifest.record(call.outputs, call.label, call.fingerprint)
            self._record_transfers(call)
            if call.stage == "evaluate":
                served = json.loads(call.outputs[0].read_text()).get("served/acc")
                log.info("%s: served accuracy %s", progress, "n/a" if served is None else f"{100 * served:.1f}%")
        metrics = self.collect_metrics()
        if is_global_zero():
            manifest.record((self.run.metrics, self.run.transfers), "pipeline", self.fingerprint_of_run(plan))
        return metrics

    def fingerprint(self, call: StageCall) -> str:
        """Hash of everything that decides what ``call`` produces (see :func:`dcccl.manifest.config_fingerprint`)."""
        return config_fingerprint(call.stage, call.command, call.config_files, call.model_args, call.trainer_args,
                                  call.data_args, call.seed, call.extra_args, self.run.root)

    @staticmethod
    def fingerprint_of_run(plan: list[tuple[RestartPoint, StageCall]]) -> str:
        """Hash of the fingerprints of every stage call of the run."""
        return hashlib.sha256("".join(call.fingerprint for _, call in plan).encode()).hexdigest()

    def reused_outputs(self) -> list[Path]:
        """The artifacts :meth:`execute` would keep rather than produce again; reads, writes nothing.

        A stage is kept when every output exists, no restart point or earlier stage forces it to run, and the
        manifest confirms its artifacts (same bytes, same config).

        Raises:
            IntegrityError: A kept artifact's bytes differ from those recorded (corrupted or truncated).
            ConfigChangedError: A finished stage's config changed and ``rerun_changed`` is off.
        """
        reused: list[Path] = []
        for restart_point, call in self.plan():
            if self._forced(restart_point) or not all(path.is_file() for path in call.outputs):
                break
            call.fingerprint = self.fingerprint(call)
            if not self._finished_as_configured(call, self.manifest, adopt=False):
                break
            reused += [path for path in call.outputs if path not in reused]
        return reused

    @property
    def manifest(self) -> Manifest:
        """The run directory's manifest, read once (its checks of unchanged files hold for the whole run)."""
        if self._manifest is None:
            self._manifest = Manifest(self.run.manifest)
        return self._manifest

    def _forced(self, restart_point: RestartPoint) -> bool:
        """Whether ``force``/``from_stage`` make the stages of ``restart_point`` run again."""
        return self.restart_from is not None and \
            RESTART_ORDER.index(restart_point) >= RESTART_ORDER.index(self.restart_from)

    def _finished_as_configured(self, call: StageCall, manifest: Manifest, adopt: bool = True) -> bool:
        """Whether a stage's existing artifacts are intact and were made with the current config.

        Raises:
            IntegrityError: an artifact's bytes differ from those recorded (corrupted or truncated).
            ConfigChangedError: the config changed and ``rerun_changed`` is off.
        """
        for path in call.outputs:
            manifest.verify(path)
        recorded = {entry.config_sha256 for path in call.outputs if (entry := manifest.entry(path)) is not None}
        if not recorded:  # written before the manifest existed (or just before a kill): adopt as they are
            if adopt and is_global_zero():
                manifest.record(call.outputs, call.label, call.fingerprint)
            return True
        if recorded == {call.fingerprint}:
            return True
        if not self.rerun_changed:
            raise ConfigChangedError(
                f"the config of the finished stage {call.label!r} changed since it ran ({call.outputs[0]}). "
                "Re-run with --rerun_changed to run it and every later stage again, choose a point with "
                "--from_stage, or use a new --run_dir")
        return False

    def _prepare_stage_dir(self, call: StageCall, fresh: bool) -> bool:
        """Whether ``call`` continues an interrupted start with the same config from its last checkpoint.

        Otherwise its old checkpoints are removed (before the new start is recorded, so every rank that reads
        the record finds them gone).
        """
        state = RunDirectory.stage_state(call.work_dir)
        same_start = not fresh and state.is_file() and \
            json.loads(state.read_text()).get("config_sha256") == call.fingerprint
        if same_start and call.last_checkpoint.is_file():
            return True
        if is_global_zero():
            shutil.rmtree(call.last_checkpoint.parent, ignore_errors=True)
            atomic_write_json(state, {"stage": call.label, "config_sha256": call.fingerprint})
        return False

    def collect_metrics(self) -> dict[str, Any]:
        """Merge the evaluations into ``metrics.json``: the last one's figures plus a per-round history."""
        history = []
        for r, path in enumerate(self.evaluation_paths(), start=1):
            with open(path) as handle:
                history.append({"round": r, **json.load(handle)})
        confusion = history[-1].get("served/confusion_matrix")
        history = [{k: v for k, v in entry.items() if k != "served/confusion_matrix"} for entry in history]
        final = {key: value for key, value in history[-1].items() if key != "round"}
        totals = self.ledger.totals()
        metrics: dict[str, Any] = {
            **final,
            "rounds": history,
            "served/acc_per_round": [entry["served/acc"] for entry in history],
            "transfers/downlink_bytes": totals["downlink_bytes"],
            "transfers/uplink_bytes": totals["uplink_bytes"],
            "transfers/per_round": totals["per_round"],
        }
        if is_global_zero():
            self.ledger.save(self.run.transfers)
            self._save_fleet_state()
            plot_accuracy_per_round(history, self.run.accuracy_plot)
            if confusion is not None:
                plot_confusion_matrix(confusion, self.run.confusion_plot)
            atomic_write_json(self.run.metrics, metrics)
        return metrics

    def _save_fleet_state(self) -> None:
        """Per round: who was sampled, online, reported, and which copies the fusion averaged."""
        for r in range(1, self.rounds + 1):
            atomic_write_json(self.run.round_dir(r) / "fleet.json", {
                "sampled": self.fleet.sampled(self.seed, r),
                "online": sorted(self.fleet.online(self.seed, r)),
                "reported": self.fleet.reporting(self.seed, r),
                "aggregation": self.fleet.aggregation,
                "fused_copies": [{"device": d, "round": rr} for d, rr in self.fleet.fused_copies(self.seed, r)],
            })

    def _check_device_call(self, call: StageCall, first: bool) -> None:
        """Refuse a device stage that would receive anything but the control model and the co-submodel."""
        allowed = {"control_model", "co_submodel", "export_path"}
        if set(call.model_args) - allowed:
            raise LedgerViolation(f"the device stage may only receive {sorted(allowed)}, got {sorted(call.model_args)}")
        overriding = [a for a in call.extra_args if a.startswith(("--model.init_args.control_model",
                                                                  "--model.init_args.co_submodel", "--model=",
                                                                  "--model.class_path", "--data.init_args.partition"))]
        if overriding:
            raise LedgerViolation(f"stage_args may not change what the device stage receives: {overriding}")
        for key in ("control_model", "co_submodel"):
            path = call.model_args.get(key)
            if path is not None:
                self.ledger.check(call.device or 0, "down", path)
        if first and self.device_budget is not None:
            self._check_budget(call)

    def _check_budget(self, call: StageCall) -> None:
        if self.sample_shape is None or self.num_classes is None:
            raise ValueError("the device budget gate needs the sample shape and class count of the data")
        control = call.model_args.get("control_model")
        measured = check_device_budget(
            self.device_budget,  # type: ignore[arg-type]
            load_network(call.model_args["co_submodel"], "co_submodel"),
            load_network(control, "control_model") if control is not None else None,
            self.sample_shape, self.num_classes,
        )
        log.info("[dcccl] device budget respected: %s", ", ".join(f"{k} {v:,.0f}" for k, v in measured.items()))

    def _record_transfers(self, call: StageCall) -> None:
        """Ledger entries of a device stage: what went down before it and what came up after it."""
        if call.stage != "device":
            return
        device, r = call.device or 0, call.round_index
        control = call.model_args.get("control_model")
        if control is not None and not any(t.device == device and t.what == "control_model"
                                           for t in self.ledger.transfers):
            self.ledger.record_file(r, device, "down", control)  # the control model goes down once per device
        self.ledger.record_file(r, device, "down", call.model_args["co_submodel"])
        self.ledger.record_file(r, device, "up", call.outputs[0])
        self.ledger.record_sample_count(r, device)
