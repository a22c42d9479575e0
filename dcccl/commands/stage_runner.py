"""The stage runner: a plan's stage calls carried out in this process through the stage CLI, the parser users run by
hand. The pipeline, the comparison, the ablation and the Flower apps all run their stages through it."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback

from dcccl.artifacts.atomic import atomic_write_text
from dcccl.commands.stage_cli import ParseOnlyCLI, cli_main, plain
from dcccl.errors import DISK_FULL_ERRNOS, ConfigError, DiskFullError, one_line
from dcccl.pipeline.boundary import ResolvedStage
from dcccl.pipeline.config_snapshot import origin_of
from dcccl.pipeline.stages import STAGES
from dcccl.pipeline.steps import StageCall
from dcccl.reporting.tracking import finish_wandb_run, name_next_wandb_run, wandb_logger_args, with_save_dirs
from lightning_modules import DeviceRoundModule, DeviceSteps


def cli_value(value: Any) -> str:
    """``value`` as a command-line value: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def stage_arguments(call: StageCall, interactive: bool = True) -> list[str]:
    """The stage CLI arguments (without subcommand) that carry out ``call``.

    When the output is not a terminal (``interactive`` false) Lightning's progress bars are turned off
    unless the trainer options ask for them: the pipeline's own progress lines remain.
    """
    args = [arg for config in call.config_files for arg in ("--config", str(config))]
    trainer_args = dict(call.trainer_args)
    if trainer_args.get("logger") not in (None, True, False):
        # A logger named without a directory: W&B runs land in the run directory, TensorBoard and CSV logs in the
        # stage's own directory.
        trainer_args["logger"] = with_save_dirs(trainer_args["logger"], call.tracking_dir or call.work_dir,
                                                call.work_dir)
    if not interactive:
        trainer_args.setdefault("enable_progress_bar", False)
    args += [f"--trainer.{key}={cli_value(value)}" for key, value in trainer_args.items()]
    args += [f"--model.init_args.{key}={cli_value(value)}" for key, value in call.model_args.items()]
    args += [f"--seed_everything={call.seed}", f"--data.init_args.seed={call.seed}"]
    args += [f"--data.init_args.{key}={cli_value(value)}" for key, value in call.data_args.items()]
    if call.partition is not None:  # the DataModule serves it only to a module instance that trains on it
        args.append(f"--data.init_args.partition={call.partition}")
    return args + list(call.extra_args)


class LightningStageRunner:
    """Runs a plan's stage calls in this process through :func:`cli_main`, the parser users run by hand.

    Unless ``verbose``, Lightning stays quiet inside a run: its start-up lines (accelerators, seeds), the warnings
    that say nothing about a pipeline's stage (logging interval, validation loader without validation step) and its
    test tables after every evaluation are left out, and its progress bars are off (the run's own display shows
    progress); ``dcccl fit|test`` alone print what Lightning prints.

    Args:
        interactive: Whether the output is a terminal; default: whether stderr is one.
        verbose: Print what Lightning prints (its progress bars too, on a terminal).
    """

    def __init__(self, interactive: Optional[bool] = None, verbose: bool = False) -> None:
        terminal = sys.stderr.isatty() if interactive is None else interactive
        self.interactive = terminal and verbose
        self.verbose = verbose
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
                cli = cli_main(args, run=False, cli_class=ParseOnlyCLI)
                self._parser, config = cli.parser, cli.config
            else:
                config = self._parser.parse_args(args)
        except ArgumentError as err:
            files = ", ".join(str(origin_of(path)) for path in call.config_files)
            raise ConfigError(f"the {call.stage} stage's config does not parse ({files}): "
                              f"{one_line(str(err))}") from err
        model, data = plain(config.model), plain(config.data)
        module_class = import_class(model["class_path"])
        return ResolvedStage(module_class, STAGES[call.stage].module, getattr(module_class, "data_partition", None),
                             dict(model.get("init_args") or {}), data)

    def __call__(self, call: StageCall, resume: bool) -> None:
        """Run ``call``; with W&B it gets its own run (grouped by pipeline, job type = stage), closed at its end."""
        if wandb_logger_args(call.trainer_args.get("logger")) is not None:
            name_next_wandb_run(group=call.group or call.stage, job_type=call.stage, name=call.run_name)
        with quiet_lightning(not self.verbose):
            self._run(call, resume)

    def _run(self, call: StageCall, resume: bool) -> None:
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
            if call.command == "test":  # Lightning's table of the metrics, unless verbose (metrics.json has them)
                cli.trainer.test(model, datamodule=cli.datamodule, verbose=self.verbose)
            else:
                getattr(cli.trainer, call.command)(model, datamodule=cli.datamodule, **resume_from)
        except OSError as err:  # Lightning's checkpoint writer does not say which file did not fit
            if err.errno in DISK_FULL_ERRNOS and not isinstance(err, DiskFullError):
                raise DiskFullError(err.errno, err.filename or call.work_dir) from err
            raise
        finally:
            finish_wandb_run()


# Lightning's warnings that say nothing about a pipeline's stage: its loaders are the DataModule's, its logging
# interval is the trainer config's, a device stage validates on nothing.
_STAGE_NOISE = (
    r".*is smaller than the logging interval.*",
    r".*You passed in a `val_dataloader` but have no `validation_step`.*",
    r".*does not have many workers which may be a bottleneck.*",
)


@contextmanager
def quiet_lightning(quiet: bool = True) -> Iterator[None]:
    """Within the block, Lightning logs only warnings and its warnings about a stage's set-up are left out."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for noise in _STAGE_NOISE:
            warnings.filterwarnings("ignore", message=noise)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def import_class(class_path: str) -> type:
    """The class a ``class_path`` (``package.module.Class``) names."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
