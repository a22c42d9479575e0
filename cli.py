"""The ``dcccl`` command: single stages through LightningCLI, the whole method through ``dcccl pipeline``.

``dcccl fit|validate|test|predict ...`` is LightningCLI over the stage modules and DataModules.
``dcccl pipeline``, ``compare`` and ``export`` parse their settings here and hand them to the core (``dcccl``);
the stage runner below runs each stage call of a plan through the very parser ``dcccl fit`` uses.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentError, ArgumentParser, Namespace
from jsonargparse.typing import register_type
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from datamodules.base import DCCCLDataModule
from dcccl.deploy.bundle import export_run, parity_report
from dcccl.errors import ConfigError, one_line, user_error_message
from dcccl.methods import METHODS, select, stage_names
from dcccl.methods.ablation import Ablation, ablation_markdown, ablation_table, read_variants, write_ablation
from dcccl.methods.comparison import Comparison, control_fidelity_of, method_costs
from dcccl.reporting.comparison import build_comparison, markdown_table, write_outputs
from dcccl.reporting.fleet import write_partition_report
from dcccl.reporting.tables import results_table
from dcccl.reporting.tracking import (
    finish_wandb_run,
    log_run_summary,
    name_next_wandb_run,
    prepare_wandb_environment,
    wandb_logger_args,
)
from dcccl.run.atomic import DISK_FULL_ERRNOS, DiskFullError, atomic_write_text
from dcccl.run.audit import MEMBERSHIP, audit_membership
from dcccl.run.boundary import ResolvedStage
from dcccl.run.config_path import ConfigPath
from dcccl.run.config_snapshot import origin_of, snapshot
from dcccl.run.coordinator import StageRunner
from dcccl.run.execution import PlanRun
from dcccl.run.exports import check_lightning_checkpoint
from dcccl.run.plan import dcccl_plan
from dcccl.run.ranks import is_global_zero
from dcccl.run.run_dir import RunDirectory
from dcccl.run.settings import PipelineSettings, RestartPoint
from dcccl.run.steps import StageCall
from lightning_modules import STAGE_MODULES, DeviceRoundModule, DeviceSteps, StageModule

log = logging.getLogger("dcccl")

STAGE_HELP = """dcccl: device-cloud collaborative controlled learning. Subcommands fit/validate/test/predict run one
stage (e.g. dcccl fit --config configs/stages/cloud.yaml); 'dcccl pipeline --help' runs the whole method,
'dcccl compare --help' compares it with the paper's baselines, 'dcccl ablate --help' compares variants of it,
'dcccl export --help' writes the ONNX bundle, 'dcccl audit --help' attacks a run's device copies."""

PIPELINE_HELP = """Run DC-CCL end to end: cloud submodel -> control model -> rounds of (cloud side, devices, fusion,
evaluation). Any --trainer.* option (e.g. --trainer.max_epochs 1, --trainer.accelerator gpu,
--trainer.devices 2 --trainer.strategy ddp) is applied to every stage. Re-running the same command skips
the stages whose artifacts exist; --force re-runs all, --from_stage re-runs from a point."""

# Files named in a config file are relative to that file (jsonargparse reads each file from its folder).
register_type(ConfigPath, serializer=str, deserializer=ConfigPath)


def _plain(value: Any) -> Any:
    """A parsed option as plain dicts and lists (jsonargparse namespaces converted)."""
    if isinstance(value, Namespace):
        return _plain(value.as_dict())
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if key != "__path__"}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


class ConfigToLoggers(SaveConfigCallback):
    """Saves the resolved config next to the logs, as LightningCLI does, and also hands it to every logger
    (the W&B run's config, CSV and TensorBoard hyperparameters)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Log the resolved config as the run's hyperparameters."""
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class DCCCLCLI(LightningCLI):
    """LightningCLI with the DataModule's shape linked into every stage and the bundled digits as default data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link ``num_classes`` and ``in_chans`` from the data to the model; default to the bundled MNIST."""
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": "datamodules.BundledMNISTDataModule"}})

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, logging to CSV in its ``default_root_dir`` unless a logger is configured.

        (Lightning's own default switches to TensorBoard whenever ``tensorboard`` happens to be installed;
        dcccl's default stays the same on every machine. ``--trainer.logger TensorBoardLogger`` picks it.)
        """
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = CSVLogger(save_dir=trainer_config.get("default_root_dir") or os.getcwd())
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then make sure a ``--ckpt_path`` file is a Lightning checkpoint before Lightning reads it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path is not None and Path(path).is_file():  # else Lightning's own names (last, best) and messages
            check_lightning_checkpoint(path, "point --ckpt_path at a .ckpt file a stage saved, e.g. "
                                             "<stage dir>/checkpoints/last.ckpt")

    def before_instantiate_classes(self) -> None:
        """With a W&B logger configured, pick its mode (offline without key or network) before it starts."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if wandb_logger_args(_plain(config.get("trainer.logger"))) is not None:
            prepare_wandb_environment()


class _ParseOnlyCLI(DCCCLCLI):
    """The stage parser without instantiating anything (artifacts a stage reads may not exist yet) or seeding."""

    def _set_seed(self) -> None:
        """Seeding belongs to the stage's run, not to the check."""

    def before_instantiate_classes(self) -> None:
        """Nothing is instantiated."""

    def instantiate_classes(self) -> None:
        """Nothing is instantiated."""


# Parse errors raise jsonargparse's ArgumentError instead of printing the usage: main() reports them in one line.
_RAISE_PARSE_ERRORS: dict[str, Any] = {"exit_on_error": False,
                                       **{name: {"exit_on_error": False} for name in LightningCLI.subcommands()}}


def cli_main(args: Optional[list[str]] = None, run: bool = True, cli_class: type[DCCCLCLI] = DCCCLCLI) -> DCCCLCLI:
    """Build (and with ``run`` execute) the stage CLI; ``args`` replaces ``sys.argv[1:]``."""
    with warnings.catch_warnings():  # the arguments are given explicitly on purpose
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended")
        return cli_class(StageModule, DCCCLDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         auto_configure_optimizers=False, save_config_callback=ConfigToLoggers,
                         save_config_kwargs={"overwrite": True},
                         parser_kwargs={"description": STAGE_HELP, **_RAISE_PARSE_ERRORS}, args=args, run=run)


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def stage_arguments(call: StageCall, interactive: bool = True) -> list[str]:
    """The stage CLI arguments (without subcommand) that carry out ``call``.

    When the output is not a terminal (``interactive`` false) Lightning's progress bars are turned off
    unless the trainer options ask for them: the pipeline's own progress lines remain.
    """
    args = [arg for config in call.config_files for arg in ("--config", str(config))]
    trainer_args = dict(call.trainer_args)
    if not interactive:
        trainer_args.setdefault("enable_progress_bar", False)
    args += [f"--trainer.{key}={_cli_value(value)}" for key, value in trainer_args.items()]
    args += [f"--model.init_args.{key}={_cli_value(value)}" for key, value in call.model_args.items()]
    args += [f"--seed_everything={call.seed}", f"--data.init_args.seed={call.seed}"]
    args += [f"--data.init_args.{key}={_cli_value(value)}" for key, value in call.data_args.items()]
    if call.partition is not None:  # the DataModule serves it only to a module instance that trains on it
        args.append(f"--data.init_args.partition={call.partition}")
    return args + list(call.extra_args)


class LightningStageRunner:
    """Runs a plan's stage calls in this process through :func:`cli_main`, the parser users run by hand.

    Args:
        interactive: Whether the output is a terminal (progress bars); default: whether stderr is one.
    """

    def __init__(self, interactive: Optional[bool] = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._parser: Optional[LightningArgumentParser] = None

    def resolve(self, call: StageCall) -> ResolvedStage:
        """The config ``call``'s stage would run with; a stage config that does not parse raises ``ConfigError``.

        A device call with secure aggregation is refused: it needs Flower's SecAgg+ between real devices.
        """
        if call.secure_sum is not None:
            raise ConfigError("secure_aggregation runs on Flower (flwr run configs/flower ...): a simulated fleet has "
                              "no devices to mask their copies; remove secure_aggregation for dcccl pipeline")
        args = stage_arguments(call)
        try:
            if self._parser is None:  # built once: parsing is cheap, building the parser is not
                cli = cli_main(args, run=False, cli_class=_ParseOnlyCLI)
                self._parser, config = cli.parser, cli.config
            else:
                config = self._parser.parse_args(args)
        except ArgumentError as err:
            files = ", ".join(str(origin_of(path)) for path in call.config_files)
            raise ConfigError(f"the {call.stage} stage's config does not parse ({files}): "
                              f"{one_line(str(err))}") from err
        model, data = _plain(config.model), _plain(config.data)
        module_class = _import_class(model["class_path"])
        return ResolvedStage(module_class, STAGE_MODULES[call.stage], getattr(module_class, "data_partition", None),
                             dict(model.get("init_args") or {}), data)

    def __call__(self, call: StageCall, resume: bool) -> None:
        """Run ``call``; with W&B it gets its own run (grouped by pipeline, job type = stage), closed at its end."""
        if wandb_logger_args(call.trainer_args.get("logger")) is not None:
            name_next_wandb_run(group=call.group or call.stage, job_type=call.stage, name=call.run_name)
        cli = cli_main(stage_arguments(call, interactive=self.interactive), run=False)
        # Whatever logger is configured, a stage's checkpoints and resolved config stay in its own directory,
        # with a last.ckpt to resume from if the stage is interrupted.
        for callback in cli.trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None) is None:
                callback.dirpath = str(call.last_checkpoint.parent)  # type: ignore[attr-defined]
            callback.save_last = "link"  # type: ignore[attr-defined]  # a link to the newest checkpoint, no copy
        for callback in cli.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, SaveConfigCallback):
                callback.save_to_log_dir = False  # written below, into the stage's own directory
        if cli.trainer.is_global_zero:
            atomic_write_text(call.work_dir / "config.yaml", cli.parser.dump(cli.config, skip_none=False))
        # A device stage trains all of its devices inside this one fit, each from the stage module as parsed; it
        # resumes from its per-device records (a checkpoint of its one epoch says nothing about missing copies).
        model = DeviceRoundModule(cli.model, call.devices, call.round_index, DeviceSteps.take_from(cli.trainer)) \
            if call.devices else cli.model
        resumes = resume and call.command == "fit" and not call.devices
        resume_from = {"ckpt_path": str(call.last_checkpoint)} if resumes else {}
        try:
            getattr(cli.trainer, call.command)(model, datamodule=cli.datamodule, **resume_from)
        except OSError as err:  # Lightning's checkpoint writer does not say which file did not fit
            if err.errno in DISK_FULL_ERRNOS and not isinstance(err, DiskFullError):
                raise DiskFullError(err.errno, err.filename or call.work_dir) from err
            raise
        finally:
            finish_wandb_run()


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------------------------
# dcccl pipeline, compare, export


def pipeline_parser(prog: str = "dcccl pipeline", description: str = PIPELINE_HELP) -> ArgumentParser:
    """The parser of ``dcccl pipeline``: :class:`PipelineSettings` plus what to re-run."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="Pipeline config file (YAML); repeatable.")
    parser.add_class_arguments(PipelineSettings, fail_untyped=True)
    parser.add_argument("--force", action=ActionYesNo, default=False, help="Re-run every stage.")
    parser.add_argument("--from_stage", type=Optional[RestartPoint], default=None,
                        help="Re-run from this point on (cloud, distill or rounds), keep what comes before.")
    parser.add_argument("--rerun_changed", action=ActionYesNo, default=False,
                        help="Re-run a finished stage whose config changed (and every later one) instead of refusing.")
    parser.add_argument("--debug", action=ActionYesNo, default=False, help="Show full tracebacks on errors.")
    return parser


def settings_from(parser: ArgumentParser, cfg: Namespace) -> PipelineSettings:
    """The settings of a parsed pipeline config (nested classes instantiated), with its stage names checked."""
    init = parser.instantiate_classes(cfg)
    settings = PipelineSettings(**{name: init[name] for name in PipelineSettings.__dataclass_fields__})
    settings.check_stage_names(stage_names())
    return settings


def _restart_point(cfg: Namespace) -> Optional[RestartPoint]:
    return "cloud" if cfg.force else cfg.from_stage


def load_datamodule(data_config: Optional[str], seed: int,
                    data_args: Optional[dict[str, Any]] = None) -> DCCCLDataModule:
    """Instantiate the DataModule a pipeline's stages use (default: the bundled digits) with ``seed``."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(DCCCLDataModule, "data")
    parser.set_defaults({"data": {"class_path": "datamodules.BundledMNISTDataModule"}})
    args = ["--config", str(data_config)] if data_config is not None else []
    extra = [f"--data.init_args.{key}={_cli_value(value)}" for key, value in (data_args or {}).items()]
    return parser.instantiate_classes(parser.parse_args([*args, f"--data.init_args.seed={seed}", *extra])).data


def datamodule_of(settings: PipelineSettings) -> DCCCLDataModule:
    """The DataModule of a run's settings, with the fleet's partition."""
    data = snapshot(settings.data) if settings.data is not None else None  # the bytes the stages read
    return load_datamodule(str(data) if data is not None else None, settings.seed_everything,
                           settings.fleet.data_arguments())


def _is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0 and is_global_zero()


def pipeline_main(argv: list[str],
                  device_runner: Optional[Callable[[LightningStageRunner], StageRunner]] = None) -> dict[str, Any]:
    """``dcccl pipeline``: parse, check everything before writing, run what must run, print the results.

    ``device_runner`` wraps the stage runner to run the device stages elsewhere (the Flower ServerApp sends them to
    real devices); every other stage runs here.
    """
    parser = pipeline_parser()
    cfg = parser.parse_args(argv)
    settings = settings_from(parser, cfg)
    local = LightningStageRunner()
    runner: StageRunner = device_runner(local) if device_runner is not None else local
    plan_run = PlanRun(settings, dcccl_plan(settings), runner, _restart_point(cfg), cfg.rerun_changed)
    data = None
    if not plan_run.up_to_date:
        data = datamodule_of(settings).describe()  # loading the data checks it
        plan_run.check(data)  # before anything is written: bad input leaves an existing run directory as it was
        if _is_rank_zero():
            atomic_write_text(settings.run.pipeline_config, parser.dump(cfg, skip_none=False))
            if settings.fleet.num_devices > 1:
                write_partition_report(settings.run, data, settings.fleet)
    metrics = plan_run.execute(data)
    if _is_rank_zero():
        if wandb_logger_args(settings.trainer.get("logger")) is not None:
            log_run_summary(settings, metrics, yaml.safe_load(parser.dump(cfg, skip_none=False)))
        print(f"\nDC-CCL results ({settings.run.root}):\n{results_table(metrics)}\nmetrics: {settings.run.metrics}")
    return metrics


COMPARE_HELP = """Compare DC-CCL with its baselines on the same data partition and seed: every method of
dcccl.methods (cloud-only model, device-affordable small model with FedAvg, on-device only, DC-CCL without control
model, DC-CCL, centralized upper bound). Takes any pipeline config; reuses and skips what the run directory holds.
Writes comparison.json, comparison.md and PNG plots into the run directory."""


def compare_parser() -> ArgumentParser:
    """The parser of ``dcccl compare``: the pipeline's options plus ``--seeds`` and ``--methods``."""
    parser = pipeline_parser("dcccl compare", COMPARE_HELP)
    parser.add_argument("--seeds", type=int, default=None, nargs="+",
                        help="Seeds to repeat every method with (mean and std are reported), e.g. --seeds 0 1 2.")
    parser.add_argument("--methods", type=str, default=None, nargs="+",
                        help=f"Methods to compare (default: all of {', '.join(sorted(METHODS))}).")
    return parser


def compare_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl compare``: every method for every seed, cost figures, fidelity, then comparison.json/.md and plots."""
    parser = compare_parser()
    cfg = parser.parse_args(argv)
    settings = settings_from(parser, cfg)
    methods = select(cfg.methods)
    comparison = Comparison(settings, cfg.seeds, methods)
    runner = LightningStageRunner()
    runs = [(method_run, PlanRun(method_run.settings, method_run.plan, runner, _restart_point(cfg), cfg.rerun_changed,
                                 metrics=method_run.metrics))
            for seed in comparison.seeds for method_run in comparison.runs(seed)]
    datamodules = {seed: datamodule_of(comparison.reference_settings(seed)) for seed in comparison.seeds}
    data = {seed: datamodule.describe() for seed, datamodule in datamodules.items()}
    for method_run, plan_run in runs:  # bad input is refused before anything is written, as for the pipeline
        plan_run.check(data[method_run.seed])
    if _is_rank_zero():
        atomic_write_text(comparison.root / "compare.yaml", parser.dump(cfg, skip_none=False))
    results: dict[int, dict[str, dict[str, Any]]] = {seed: {} for seed in comparison.seeds}
    for method_run, plan_run in runs:
        log.info("[dcccl compare] seed %d: %s", method_run.seed, method_run.method.title)
        results[method_run.seed][method_run.method.name] = plan_run.execute(data[method_run.seed])
    if not _is_rank_zero():
        return {}
    fidelity = {seed: control_fidelity_of(run.cloud_submodel, run.control_model, datamodules[seed])
                for seed in comparison.seeds for run in [comparison.reference_settings(seed).run]}
    costs = method_costs(comparison.runs(comparison.seeds[0]), datamodules[comparison.seeds[0]])
    table = build_comparison(results, costs, fidelity, methods)
    paths = write_outputs(table, comparison.root)
    print(f"\nDC-CCL comparison ({comparison.root}):\n\n{markdown_table(table)}")
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return table


ABLATE_HELP = """Run variants of DC-CCL side by side on the same data partition and seeds, and write the table of their
accuracies and control-model fidelity (mean and std over the seeds) to <run_dir>/ablation/ablation.md and .json.
--variants names a YAML file of variants: each a description and the pipeline settings it changes (see
configs/ablations/variants.yaml); the first variant is the reference, and a variant whose cloud and distillation
stages are the reference's takes the reference's cloud submodel and control model instead of training them again."""


def ablate_parser() -> ArgumentParser:
    """The parser of ``dcccl ablate``: the pipeline's options plus ``--variants``, ``--only`` and ``--seeds``."""
    parser = pipeline_parser("dcccl ablate", ABLATE_HELP)
    parser.add_argument("--variants", type=ConfigPath, required=True, help="YAML file of variants.")
    parser.add_argument("--only", type=str, default=None, nargs="+", help="Run only these variants (and the first).")
    parser.add_argument("--seeds", type=int, default=[0], nargs="+", help="Seeds, e.g. --seeds 0 1 2.")
    parser.add_argument("--audit", action=ActionYesNo, default=False,
                        help="Run dcccl audit's membership-inference attack on every variant's device copies and add "
                             "its AUC to the table.")
    return parser


def variant_settings(parser: ArgumentParser, cfg: Namespace,
                     described: dict[str, dict[str, Any]]) -> dict[str, PipelineSettings]:
    """Each variant's pipeline settings: the parsed config with the variant's settings parsed over it."""
    return {name: settings_from(parser, parser.parse_object(entry["settings"], namespace=cfg.clone()))
            for name, entry in described.items()}


def ablate_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl ablate``: every variant for every seed, then ablation.json/.md."""
    parser = ablate_parser()
    cfg = parser.parse_args(argv)
    described = read_variants(Path(cfg.variants), cfg.only)
    variants = variant_settings(parser, cfg, described)
    first = next(iter(variants.values()))
    ablation = Ablation(variants, cfg.seeds, first.run.root / "ablation")
    runner = LightningStageRunner()
    runs = [(run, PlanRun(run.settings, run.plan, runner, _restart_point(cfg), cfg.rerun_changed))
            for seed in ablation.seeds for run in ablation.runs(seed)]
    datamodules = {seed: datamodule_of(replace(first, seed_everything=seed)) for seed in ablation.seeds}
    data = {seed: datamodule.describe() for seed, datamodule in datamodules.items()}
    for run, plan_run in runs:  # bad input is refused before anything is written
        plan_run.check(data[run.seed])
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in variants}
    for run, plan_run in runs:
        log.info("[dcccl ablate] seed %d: %s", run.seed, run.name)
        metrics = plan_run.execute(data[run.seed])
        fidelity = control_fidelity_of(run.cloud_submodel, run.control_model, datamodules[run.seed])
        results[run.name][run.seed] = {**metrics, "fidelity": fidelity}
        if cfg.audit and _is_rank_zero():
            audited = audit_membership(run.plan, datamodule_of(run.settings), run.settings.run.root,
                                       run.settings.device_guide == "control_model", run.seed)
            results[run.name][run.seed]["membership/auc"] = audited["auc"]
    if not _is_rank_zero():
        return {}
    table = ablation_table(results)
    paths = write_ablation(table, {name: entry.get("description", "") for name, entry in described.items()},
                           ablation.root)
    print(f"\nDC-CCL variants ({ablation.root}):\n\n{ablation_markdown(table, {})}")
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return table


EXPORT_HELP = """Export the on-device bundle of a pipeline run: the control model and the co-submodel (what runs on
a device) and the served cloud + co model, as ONNX or TorchScript with a dynamic batch dimension, plus bundle.json
(input shape, normalisation, class names). Parity with PyTorch is checked on real test samples by running the
written files (onnxruntime for ONNX, torch.jit.load for TorchScript)."""


def export_parser() -> ArgumentParser:
    """The parser of ``dcccl export``."""
    parser = ArgumentParser(prog="dcccl export", description=EXPORT_HELP, exit_on_error=False)
    parser.add_argument("--run_dir", type=str, required=True, help="A pipeline run directory.")
    parser.add_argument("--format", type=Literal["onnx", "torchscript"], default="onnx",
                        help="Export format: onnx (.onnx graphs) or torchscript (traced .pt files for torch.jit.load).")
    parser.add_argument("--out_dir", type=Optional[str], default=None, help="Default: <run_dir>/export/<format>.")
    parser.add_argument("--samples", type=int, default=256, help="Test samples for the parity check.")
    parser.add_argument("--debug", action=ActionYesNo, default=False, help="Show full tracebacks on errors.")
    return parser


def export_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl export``: write the bundle of a run in the chosen format and report the parity check."""
    cfg = export_parser().parse_args(argv)
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "pipeline.yaml"
    if not saved.is_file():
        raise ConfigError(f"{saved} not found: --run_dir must be a pipeline run directory")
    pipeline_cfg = pipeline_parser().parse_path(str(saved))
    datamodule = load_datamodule(pipeline_cfg.data, pipeline_cfg.seed_everything)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "export" / cfg.format
    bundle = export_run(run_dir, out_dir, datamodule.test_dataset(), datamodule.input_description(), cfg.format,
                        cfg.samples)
    print("\n".join(parity_report(bundle, out_dir)))
    if not all(check["passed"] for check in bundle["parity"].values()):
        raise SystemExit("dcccl export: parity check failed (see above)")
    return bundle


AUDIT_HELP = """Attack every device copy a finished pipeline run uploaded with a loss-threshold membership-inference
attack: the loss of control(x) + copy(x) on the device's training samples against device-side samples no device
trained on, matched class by class. Writes membership.json (each copy's AUC, each round's mean, the run's epsilon)
and membership_roc.png in the run directory; AUC 0.5 means the copies give nothing away."""


def audit_parser() -> ArgumentParser:
    """The parser of ``dcccl audit``."""
    parser = ArgumentParser(prog="dcccl audit", description=AUDIT_HELP, exit_on_error=False)
    parser.add_argument("--run_dir", type=str, required=True, help="A finished pipeline run directory.")
    parser.add_argument("--samples", type=int, default=1000,
                        help="At most this many training samples (and as many held-out ones) per copy.")
    parser.add_argument("--debug", action=ActionYesNo, default=False, help="Show full tracebacks on errors.")
    return parser


def audit_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl audit``: the membership-inference attack on a finished run's device copies."""
    cfg = audit_parser().parse_args(argv)
    run = RunDirectory(cfg.run_dir)
    if not run.pipeline_config.is_file() or not run.metrics.is_file():
        raise ConfigError(f"{cfg.run_dir} holds no finished pipeline run (no pipeline.yaml and metrics.json): run "
                          "dcccl pipeline first, then audit its --run_dir")
    if cfg.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {cfg.samples}")
    parser = pipeline_parser()
    settings = settings_from(parser, parser.parse_path(str(run.pipeline_config)))
    settings.run_dir = str(run.root)
    report = audit_membership(dcccl_plan(settings), datamodule_of(settings), run.root,
                              settings.device_guide == "control_model", settings.seed_everything, cfg.samples)
    epsilon = report.get("privacy/epsilon_max")
    spent = f" at epsilon {epsilon:.2f} (delta {report['privacy/delta']:g})" if epsilon is not None else " (no DP)"
    print(f"membership inference on the last round's copies{spent}: AUC {report['auc']:.3f} (mean over devices, "
          f"max {report['auc_max']:.3f}; 0.5 = chance) -> {run.root / MEMBERSHIP}")
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Errors: bad input (dcccl's own error types, parse errors, a full disk) in one line; anything else is a bug.

# Warnings about things dcccl does on purpose: frozen guides in eval mode.
_INTENDED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


class _RankZeroOnly(logging.Filter):
    """Under DDP every process runs the pipeline; only global rank zero reports progress."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _is_rank_zero()


class _DropAdvertisements(logging.Filter):
    """Drops Lightning's product tips from the console; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


COMMANDS = {"pipeline": pipeline_main, "compare": compare_main, "ablate": ablate_main, "export": export_main,
            "audit": audit_main}


def configure_logging() -> None:
    """dcccl's progress lines on the console (global rank zero only), without Lightning's tips or intended warnings."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisements())
    log.addFilter(_RankZeroOnly())
    for intended in _INTENDED_WARNINGS:
        warnings.filterwarnings("ignore", message=intended)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``dcccl`` console script."""
    # Like `python -m`, make the user's own modules (backbones, stage subclasses) importable by name.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    configure_logging()
    args = sys.argv[1:] if argv is None else list(argv)
    command = args[0] if args and args[0] in COMMANDS else None
    debug = "--debug" in args  # every command takes it; the stage CLI does not know it
    try:
        if command is not None:
            COMMANDS[command](args[1:])
        else:
            cli_main([arg for arg in args if arg != "--debug"])
    except Exception as err:
        message = None if debug else user_error_message(err)
        if message is None:
            raise
        name = f"dcccl {args[0]}" if args[:1] and not args[0].startswith("-") else "dcccl"
        hint = f"see {name} --help" if isinstance(err, ArgumentError) else "--debug shows the traceback"
        print(f"{name}: error: {message} ({hint})", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
