"""The ``dcccl`` command: single stages through LightningCLI, the whole method through ``dcccl pipeline``.

``dcccl fit|validate|test|predict ...`` is LightningCLI over the stage modules and DataModules.
``dcccl pipeline ...`` drives every stage in order, building each one through the same parser.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace
from jsonargparse.typing import register_type
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from datamodules.base import DCCCLDataModule
from dcccl.atomic import DISK_FULL_ERRNOS, DiskFullError, atomic_write_json, atomic_write_text
from dcccl.backbones.registry import BackboneNotFoundError, check_backbone, torch_load_problem
from dcccl.backbones.spec import BackboneSpec
from dcccl.budget import DeviceBudgetExceeded
from dcccl.bundle_export import export_bundle
from dcccl.comparison import Comparison, method_costs
from dcccl.comparison_report import build_comparison, markdown_table, write_outputs
from dcccl.costs import control_fidelity
from dcccl.exports import ExportError, load_network
from dcccl.fleet_partition import label_histogram, partition_summary
from dcccl.ledger import LedgerViolation
from dcccl.manifest import ConfigChangedError, IntegrityError
from dcccl.pipeline import Pipeline, StageCall, StageFailedError
from dcccl.plots import plot_label_histogram
from dcccl.preflight import check_budget_before_running, check_reused_exports
from dcccl.ranks import is_global_zero
from dcccl.report import results_table
from dcccl.tracking import (
    finish_wandb_run,
    log_pipeline_summary,
    name_next_wandb_run,
    prepare_wandb_environment,
    wandb_logger_args,
)
from lightning_modules.base import NonFiniteLossError, StageModule

log = logging.getLogger("dcccl")

STAGE_HELP = """dcccl: device-cloud collaborative controlled learning. Subcommands fit/validate/test/predict run one
stage (e.g. dcccl fit --config configs/stages/cloud.yaml); 'dcccl pipeline --help' runs the whole method,
'dcccl compare --help' compares it with the paper's baselines, 'dcccl export --help' writes the ONNX bundle."""

PIPELINE_HELP = """Run DC-CCL end to end: cloud submodel -> control model -> rounds of (cloud side, device, fusion,
evaluation). Any --trainer.* option (e.g. --trainer.max_epochs 1, --trainer.accelerator gpu,
--trainer.devices 2 --trainer.strategy ddp) is applied to every stage. Re-running the same command skips
the stages whose artifacts exist; --force re-runs all, --from_stage re-runs from a point."""


def _plain(value: Any) -> Any:
    """A parsed option as plain dicts and lists (jsonargparse namespaces converted)."""
    if isinstance(value, Namespace):
        return value.as_dict()
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


_CKPT_ADVICE = "point --ckpt_path at a .ckpt file a stage saved, e.g. <stage dir>/checkpoints/last.ckpt"


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
        if path is None or not Path(path).is_file():
            return  # Lightning's own names (last, best, ...) and its own message for a missing file
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=False)
        except Exception as err:  # torch raises several types for foreign or corrupt files
            raise ValueError(f"{path} is not a Lightning checkpoint ({torch_load_problem(Path(path), err)}): "
                             f"{_CKPT_ADVICE}") from err
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict in it): {_CKPT_ADVICE}")

    def before_instantiate_classes(self) -> None:
        """With a W&B logger configured, pick its mode (offline without key or network) before it starts."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if wandb_logger_args(_plain(config.get("trainer.logger"))) is not None:
            prepare_wandb_environment()


# Parse errors raise jsonargparse's ArgumentError instead of printing the usage: main() reports them in one line.
_RAISE_PARSE_ERRORS: dict[str, Any] = {"exit_on_error": False,
                                       **{name: {"exit_on_error": False} for name in LightningCLI.subcommands()}}


def cli_main(args: Optional[list[str]] = None, run: bool = True, cli_class: type[DCCCLCLI] = DCCCLCLI) -> DCCCLCLI:
    """Build (and with ``run`` execute) the stage CLI; ``args`` replaces ``sys.argv[1:]``.

    ``cli_class`` may narrow what happens after parsing (the pipeline's input check parses only).
    """
    return cli_class(
        StageModule,
        DCCCLDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=ConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": STAGE_HELP, **_RAISE_PARSE_ERRORS},
        args=args,
        run=run,
    )


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def stage_arguments(call: StageCall, interactive: bool = True) -> list[str]:
    """The stage CLI arguments (without subcommand) that carry out ``call``.

    When the output is not a terminal (``interactive`` false) Lightning's progress bars are turned off
    unless the trainer options ask for them: the pipeline's own progress lines remain.
    """
    args: list[str] = []
    for config in call.config_files:
        args += ["--config", str(config)]
    trainer_args = dict(call.trainer_args)
    if not interactive:
        trainer_args.setdefault("enable_progress_bar", False)
    args += [f"--trainer.{key}={_cli_value(value)}" for key, value in trainer_args.items()]
    args += [f"--model.init_args.{key}={_cli_value(value)}" for key, value in call.model_args.items()]
    args += [f"--seed_everything={call.seed}", f"--data.init_args.seed={call.seed}"]
    args += [f"--data.init_args.{key}={_cli_value(value)}" for key, value in call.data_args.items()]
    return args + call.extra_args


def run_stage(call: StageCall) -> None:
    """Execute one stage call in this process through :func:`cli_main`.

    With W&B, the stage gets its own run (grouped by pipeline, job type = stage, named by round and device),
    closed when the stage ends.
    """
    if wandb_logger_args(call.trainer_args.get("logger")) is not None:
        name_next_wandb_run(group=call.group or call.stage, job_type=call.stage, name=call.run_name)
    with warnings.catch_warnings():
        # The pipeline's own command line is in sys.argv; the stage's arguments are given explicitly.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended")
        cli = cli_main(stage_arguments(call, interactive=sys.stderr.isatty()), run=False)
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
    resume_from = {"ckpt_path": str(call.last_checkpoint)} if call.resume and call.command == "fit" else {}
    try:
        getattr(cli.trainer, call.command)(cli.model, datamodule=cli.datamodule, **resume_from)
    finally:
        finish_wandb_run()


def split_trainer_arguments(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Take ``--trainer.KEY VALUE`` / ``--trainer.KEY=VALUE`` out of ``argv``; values are parsed as YAML."""
    trainer: dict[str, Any] = {}
    rest: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if not token.startswith("--trainer."):
            rest.append(token)
            continue
        key, sep, raw = token[len("--trainer."):].partition("=")
        if not sep:
            raw = next(tokens, None)  # type: ignore[assignment]
            if raw is None:
                raise SystemExit(f"dcccl pipeline: --trainer.{key} needs a value")
        trainer[key] = yaml.safe_load(raw)
    return trainer, rest


def _absolute_path(value: str | Path) -> Path:
    # jsonargparse deserialises values read from a config file while in that file's folder.
    return Path(value).absolute()


# Input files named in a config file are relative to that file; on the command line, to the working directory.
register_type(Path, serializer=str, deserializer=_absolute_path)


def pipeline_parser() -> ArgumentParser:
    """The parser of ``dcccl pipeline``, built from :class:`dcccl.pipeline.Pipeline`'s signature."""
    parser = ArgumentParser(prog="dcccl pipeline", description=PIPELINE_HELP, env_prefix="DCCCL", default_env=False,
                            exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="Pipeline config file (YAML); repeatable.")
    parser.add_argument("--debug", type=bool, default=False, help="Show full tracebacks on errors.")
    parser.add_class_arguments(Pipeline, fail_untyped=True)
    return parser


# Switches that read naturally alone on a command line: ``--force`` means ``--force true``.
BARE_SWITCHES = ("--force", "--rerun_changed", "--debug")


def with_bare_switches(argv: list[str]) -> list[str]:
    """``argv`` with ``true`` after each of :data:`BARE_SWITCHES` given without a value."""
    completed: list[str] = []
    for position, token in enumerate(argv):
        completed.append(token)
        following = argv[position + 1] if position + 1 < len(argv) else "--"
        if token in BARE_SWITCHES and following.startswith("--"):
            completed.append("true")
    return completed


def parse_with_trainer_options(parser: ArgumentParser, argv: list[str]) -> Namespace:
    """Parse ``argv``; ``--trainer.*`` options are merged into the config's ``trainer`` dict (they win)."""
    trainer_overrides, rest = split_trainer_arguments(with_bare_switches(argv))
    cfg = parser.parse_args(rest)
    cfg.trainer = {**(cfg.trainer or {}), **trainer_overrides}
    return cfg


def pipeline_settings(parser: ArgumentParser, cfg: Namespace) -> dict[str, Any]:
    """Keyword arguments of :class:`Pipeline` from a parsed pipeline config (dataclasses instantiated)."""
    init = parser.instantiate_classes(cfg)
    return {name: init[name] for name in inspect.signature(Pipeline).parameters}


def build_pipeline(parser: ArgumentParser, cfg: Namespace) -> Pipeline:
    """Instantiate the pipeline from a parsed config."""
    return Pipeline(**pipeline_settings(parser, cfg))


def load_datamodule(data_config: Optional[Path], seed: int,
                    data_args: Optional[dict[str, Any]] = None) -> DCCCLDataModule:
    """Instantiate the DataModule a pipeline's stages use (default: the bundled digits) with ``seed``."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(DCCCLDataModule, "data")
    parser.set_defaults({"data": {"class_path": "datamodules.BundledMNISTDataModule"}})
    args = ["--config", str(data_config)] if data_config is not None else []
    extra = [f"--data.init_args.{key}={_cli_value(value)}" for key, value in (data_args or {}).items()]
    cfg = parser.parse_args([*args, f"--data.init_args.seed={seed}", *extra])
    return parser.instantiate_classes(cfg).data


def _is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0 and is_global_zero()


def describe_data(pipeline: Pipeline) -> None:
    """What the pipeline needs to know of the data: the fleet's partition (saved and plotted) and, for the
    device budget gate, the shape of a sample."""
    if pipeline.fleet.num_devices == 1 and pipeline.device_budget is None:
        return
    datamodule = load_datamodule(pipeline.data, pipeline.seed, pipeline.fleet_data_arguments())
    pipeline.num_classes = datamodule.num_classes
    pipeline.sample_shape = tuple(datamodule.train_dataset("cloud")[0][0].shape)
    if pipeline.fleet.num_devices > 1 and _is_rank_zero():
        labels = datamodule.data.device_labels
        atomic_write_json(pipeline.run.fleet_partition,
                          partition_summary(labels, datamodule.device_parts, datamodule.num_classes))
        plot_label_histogram(label_histogram(labels, datamodule.device_parts, datamodule.num_classes),
                             pipeline.run.fleet_partition.with_suffix(".png"),
                             title=f"Device label distribution ({pipeline.fleet.partitioner}, "
                                   f"{pipeline.fleet.num_devices} devices)")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input is refused before the pipeline writes anything. Each check lives with what it checks (the DataModule,
# the stage parser, the backbone registry, dcccl.preflight); this section only calls them in order.


class _ParseOnlyCLI(DCCCLCLI):
    """A stage's arguments parsed and type-checked by the very parser the stage runs with; nothing is instantiated
    (the artifacts a stage reads may not exist yet) and no seed is set."""

    def _set_seed(self) -> None:
        """Seeding belongs to the stage's run, not to the check."""

    def before_instantiate_classes(self) -> None:
        """Nothing is instantiated."""

    def instantiate_classes(self) -> None:
        """Nothing is instantiated."""


def parse_stage(call: StageCall) -> Namespace:
    """The config ``call``'s stage would run with; a stage config that does not parse raises ``ValueError``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended")
        try:
            return cli_main(stage_arguments(call), run=False, cli_class=_ParseOnlyCLI).config
        except ArgumentError as err:
            files = ", ".join(str(path) for path in call.config_files)
            raise ValueError(f"the {call.stage} stage's config does not parse ({files}): {one_line(str(err))}") from err


def backbone_specs(value: Any) -> Iterator[dict[str, Any]]:
    """Every backbone spec (a mapping with ``name``, ``checkpoint_path`` and ``kwargs``) nested in ``value``,
    including base models nested in a spec's ``kwargs`` (the ``split`` backbone)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        if {"name", "checkpoint_path", "kwargs"} <= set(value):
            yield value
        for item in value.values():
            yield from backbone_specs(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from backbone_specs(item)


def _model_backbone(config: Optional[Namespace], key: str) -> Optional[BackboneSpec]:
    value = config.get(f"model.init_args.{key}") if config is not None else None
    if value is None:
        return None
    return BackboneSpec.from_dict(value.as_dict() if isinstance(value, Namespace) else dict(value))


def validate_inputs(pipeline: Pipeline) -> None:
    """Check the data, every stage's config and what the run directory would reuse; write nothing.

    Raises the error of the first check that fails: the DataModule's (folders, class split, images, fleet
    partition), the stage parser's (unknown keys, wrong types), the registry's (unknown backbone, unreadable
    weights), the manifest's (kept artifacts corrupted, or made with another config) and :mod:`dcccl.preflight`'s
    (kept exports trained on other data, device budget exceeded).
    """
    datamodule = load_datamodule(pipeline.data, pipeline.seed, pipeline.fleet_data_arguments())
    datamodule.data  # noqa: B018 - prepares the split, which checks it
    datamodule.device_parts  # noqa: B018 - the fleet's partition checks itself
    configs: dict[str, Namespace] = {}
    for _, call in pipeline.plan():
        if call.stage not in configs:
            configs[call.stage] = parse_stage(call)
            for spec in backbone_specs(configs[call.stage].get("model")):
                check_backbone(spec["name"], spec["checkpoint_path"])
    reused = check_reused_exports(pipeline, datamodule.num_classes, datamodule.in_chans)
    if pipeline.device_budget is not None:
        check_budget_before_running(
            pipeline, reused, _model_backbone(configs.get("distill"), "backbone"),
            _model_backbone(configs.get("cloud_round"), "co_backbone"),
            tuple(datamodule.train_dataset("cloud")[0][0].shape), datamodule.num_classes, datamodule.in_chans)


def pipeline_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl pipeline``: parse, save the resolved config, run every stage, print the results."""
    parser = pipeline_parser()
    cfg = parse_with_trainer_options(parser, argv)
    pipeline = build_pipeline(parser, cfg)
    validate_inputs(pipeline)  # before anything is written: bad input leaves an existing run directory as it was
    if _is_rank_zero():
        atomic_write_text(pipeline.run.pipeline_config, parser.dump(cfg, skip_none=False))
    describe_data(pipeline)
    metrics = pipeline.execute(run_stage)
    if _is_rank_zero():
        wandb_args = wandb_logger_args(pipeline.trainer.get("logger"))
        if wandb_args is not None:
            log_pipeline_summary(metrics, yaml.safe_load(parser.dump(cfg, skip_none=False)), pipeline.name,
                                 wandb_args.get("save_dir") or wandb_args.get("dir") or pipeline.run.root,
                                 wandb_args.get("project"),
                                 (pipeline.run.accuracy_plot, pipeline.run.confusion_plot))
        print(f"\nDC-CCL results ({pipeline.run.root}):\n{results_table(metrics)}\nmetrics: {pipeline.run.metrics}")
    return metrics


COMPARE_HELP = """Compare DC-CCL with its baselines on the same data partition and seed: cloud-only model,
device-affordable small model (FedAvg), on-device only, DC-CCL without control model, DC-CCL, centralized
(privacy-violating upper bound). Takes any pipeline config; reuses and skips what the run directory holds.
Writes comparison.json, comparison.md and PNG plots into the run directory."""


def compare_parser() -> ArgumentParser:
    """The parser of ``dcccl compare``: the pipeline's options plus ``--seeds``."""
    parser = pipeline_parser()
    parser.prog, parser.description = "dcccl compare", COMPARE_HELP
    parser.add_argument("--seeds", type=int, default=None, nargs="+",
                        help="Seeds to repeat every method with (mean and std are reported), e.g. --seeds 0 1 2.")
    return parser


def _device_batch(datamodule: DCCCLDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(DataLoader(datamodule.train_dataset("device"), batch_size=datamodule.batch_size)))


def _dataset_bytes(dataset: Dataset) -> int:
    return sum(x.numel() * x.element_size() for x, _ in DataLoader(dataset, batch_size=256))


def compare_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl compare``: every method, cost figures, fidelity, then comparison.json/.md and plots."""
    parser = compare_parser()
    cfg = parse_with_trainer_options(parser, argv)
    settings = pipeline_settings(parser, cfg)
    comparison = Comparison(settings, cfg.seeds)
    for seed in comparison.seeds:  # bad input is refused before anything is written, as for the pipeline
        validate_inputs(comparison.variants(seed)["dcccl"])
    if _is_rank_zero():
        atomic_write_text(comparison.root / "compare.yaml", parser.dump(cfg, skip_none=False))
    results = comparison.execute(run_stage)
    if not _is_rank_zero():
        return {}
    fidelity = {}
    for seed in comparison.seeds:
        datamodule = load_datamodule(settings["data"], seed)
        run = comparison.variants(seed)["dcccl"].run
        cloud = load_network(run.cloud_submodel, "cloud_submodel")
        control = load_network(run.control_model, "control_model")
        fidelity[seed] = {
            f"{side}_test": control_fidelity(cloud, control, DataLoader(datamodule.val_dataset(side), batch_size=256))
            for side in ("cloud", "device")
        }
    first = comparison.seeds[0]
    datamodule = load_datamodule(settings["data"], first)
    x, y = _device_batch(datamodule)
    costs = method_costs(comparison.variants(first), x, y, _dataset_bytes(datamodule.train_dataset("device")))
    table = build_comparison(results, costs, fidelity)
    paths = write_outputs(table, comparison.root)
    print(f"\nDC-CCL comparison ({comparison.root}):\n\n{markdown_table(table)}")
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
    parser.add_argument("--debug", type=bool, default=False, help="Show full tracebacks on errors.")
    return parser


def export_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl export``: write the bundle of a run in the chosen format and report the parity check."""
    cfg = export_parser().parse_args(argv)
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "pipeline.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved} not found: --run_dir must be a pipeline run directory")
    pipeline_cfg = pipeline_parser().parse_path(str(saved))
    datamodule = load_datamodule(pipeline_cfg.data, pipeline_cfg.seed_everything)
    test = datamodule.test_dataset()
    images = torch.stack([test[i][0] for i in range(min(cfg.samples, len(test)))])  # type: ignore[arg-type]
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "export" / cfg.format
    bundle = export_bundle(run_dir, out_dir, images, datamodule.input_description(), cfg.format)
    for name, check in bundle["parity"].items():
        verdict = "passed" if check["passed"] else "FAILED"
        print(f"{name:>14}: {out_dir / bundle['files'][name]}  parity {verdict} on {check['samples']} test samples "
              f"with {check['runtime']} (max |logit diff| {check['max_abs_logit_diff']:.2e}, "
              f"same top-1: {check['same_top1']})")
    if not all(check["passed"] for check in bundle["parity"].values()):
        raise SystemExit("dcccl export: parity check failed (see above)")
    return bundle


_USER_ERRORS = (ExportError, BackboneNotFoundError, StageFailedError, FileNotFoundError, ValueError,
                LedgerViolation, DeviceBudgetExceeded, NonFiniteLossError, DiskFullError, IntegrityError,
                ConfigChangedError)

# Lines of jsonargparse's messages that say nothing to a user (a class that fails is reported as a Union mismatch).
_PARSER_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
                 "Given value:", "- Expected a <class 'NoneType'>")


def one_line(message: str) -> str:
    """``message`` on one line, without jsonargparse's type-matching details."""
    lines = (line.strip() for line in message.splitlines())
    return " ".join(line.removeprefix("- ") for line in lines if line and not line.startswith(_PARSER_NOISE))


def _raised_in_jsonargparse(err: BaseException) -> bool:
    innermost = err.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    return innermost is not None and "jsonargparse" in Path(innermost.tb_frame.f_code.co_filename).parts


def _file_being_written(err: BaseException) -> Optional[str]:
    """The file a failed write was writing, when the error does not say: the innermost frame's path variable
    (Lightning's checkpoint writer reports a full disk without the file name)."""
    frames = []
    trace = err.__traceback__
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    for frame in reversed(frames):
        for name in ("filepath", "urlpath", "path", "filename"):
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)):
                return str(value)
    return None


def user_error_message(err: BaseException) -> Optional[str]:
    """What is wrong with the user's input, in one line; ``None`` when ``err`` is not about the input (a bug)."""
    if isinstance(err, ArgumentError):
        return one_line(str(err))
    while err.__cause__ is not None and _raised_in_jsonargparse(err):  # jsonargparse wraps errors of __init__
        err = err.__cause__
    if isinstance(err, _USER_ERRORS):
        return one_line(str(err))
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return str(DiskFullError(err.errno, err.filename or _file_being_written(err) or "a file"))
    return None


def take_debug_flag(args: list[str]) -> tuple[bool, list[str]]:
    """Whether ``args`` ask for tracebacks (``--debug``, ``--debug=true``, ``--debug true``), and ``args`` without
    that flag (the stage CLI does not know it)."""
    debug, rest, position = False, [], 0
    while position < len(args):
        token = args[position]
        position += 1
        if token == "--debug":
            value = args[position].lower() if position < len(args) else ""
            debug = value != "false"
            position += value in ("true", "false")
        elif token.startswith("--debug="):
            debug = token.partition("=")[2].lower() == "true"
        else:
            rest.append(token)
    return debug, rest


# Warnings about things dcccl does on purpose: frozen guides in eval mode, fusion that trains nothing.
_INTENDED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*You passed in a `val_dataloader` but have no `validation_step`.*",
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


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``dcccl`` console script."""
    # Like `python -m`, make the user's own modules (backbones, stage subclasses) importable by name.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisements())
    log.addFilter(_RankZeroOnly())
    for intended in _INTENDED_WARNINGS:
        warnings.filterwarnings("ignore", message=intended)
    args = sys.argv[1:] if argv is None else list(argv)
    debug, rest = take_debug_flag(args)  # understood by every command, with or without a value
    entries = {"pipeline": pipeline_main, "compare": compare_main, "export": export_main}
    try:
        if args[:1] and args[0] in entries:
            entries[args[0]](rest[1:])
        else:
            with warnings.catch_warnings():  # the arguments are sys.argv's, less --debug
                warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended")
                cli_main(rest)
    except Exception as err:
        message = None if debug else user_error_message(err)
        if message is None:
            raise
        command = f"dcccl {args[0]}" if args[:1] and not args[0].startswith("-") else "dcccl"
        hint = f"see {command} --help" if isinstance(err, ArgumentError) else "--debug shows the traceback"
        print(f"{command}: error: {message} ({hint})", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
