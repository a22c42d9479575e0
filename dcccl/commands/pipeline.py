"""``dcccl pipeline``: the pipeline's parser, its settings and DataModule, one run from its checks to its table; and
the loop that checks, then runs, the plans of ``dcccl compare`` and ``dcccl ablate``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from dcccl.artifacts.atomic import atomic_write_text
from dcccl.methods import stage_names
from dcccl.pipeline.boundary import ResolvedStage
from dcccl.pipeline.config_snapshot import snapshot
from dcccl.pipeline.coordinator import StageRunner
from dcccl.pipeline.execution import PlanRun
from dcccl.pipeline.partition_report import write_partition_report
from dcccl.pipeline.plan import dcccl_plan
from dcccl.pipeline.preflight import DataDescription
from dcccl.pipeline.settings import PipelineSettings, RestartPoint
from dcccl.pipeline.steps import StageCall
from dcccl.ranks import is_global_zero
from dcccl.reporting.tables import results_table
from dcccl.reporting.tracking import log_run_summary, wandb_logger_args

if TYPE_CHECKING:
    from datamodules.base import DCCCLDataModule

log = logging.getLogger("dcccl")

PIPELINE_HELP = """Run DC-CCL end to end: cloud submodel -> control model -> rounds of (cloud side, devices, fusion,
evaluation). Any --trainer.* option (e.g. --trainer.max_epochs 1, --trainer.accelerator gpu,
--trainer.devices 2 --trainer.strategy ddp) is applied to every stage. Re-running the same command skips
the stages whose artifacts exist; --force re-runs all, --from_stage re-runs from a point."""


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
    parser.add_argument("--verbose", action=ActionYesNo, default=False,
                        help="Print what Lightning prints inside each stage (start-up lines, warnings, test tables; "
                             "its progress bars on a terminal) instead of the run's own progress alone.")
    parser.add_argument("--debug", action=ActionYesNo, default=False, help="Show full tracebacks on errors.")
    return parser


def settings_from(parser: ArgumentParser, cfg: Namespace) -> PipelineSettings:
    """The settings of a parsed pipeline config (nested classes instantiated)."""
    init = parser.instantiate_classes(cfg)
    return PipelineSettings(**{name: init[name] for name in PipelineSettings.__dataclass_fields__})


def check_stage_names(settings: PipelineSettings) -> None:
    """Refuse a config that names no stage config a run needs, or names a stage no module or method knows.

    The stages are known once their modules are imported (each registers itself), which imports Lightning: a command
    checks them when it is about to run something.
    """
    import lightning_modules  # noqa: F401  (importing it registers every stage)
    from dcccl.pipeline.stages import required_stages

    settings.check_stages(stage_names(), required_stages(settings))


def restart_point(cfg: Namespace) -> Optional[RestartPoint]:
    """Where a parsed command re-runs from: all with ``--force``, else ``--from_stage`` (``None``: what is not done)."""
    return "cloud" if cfg.force else cfg.from_stage


def load_datamodule(data_config: Optional[str], seed: int,
                    data_args: Optional[dict[str, Any]] = None) -> DCCCLDataModule:
    """Instantiate the DataModule a pipeline's stages use (default: the bundled digits) with ``seed``."""
    from datamodules import DEFAULT_DATAMODULE
    from datamodules.base import DCCCLDataModule
    from dcccl.commands.stage_runner import cli_value

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(DCCCLDataModule, "data")
    parser.set_defaults({"data": {"class_path": DEFAULT_DATAMODULE}})
    args = ["--config", str(data_config)] if data_config is not None else []
    extra = [f"--data.init_args.{key}={cli_value(value)}" for key, value in (data_args or {}).items()]
    return parser.instantiate_classes(parser.parse_args([*args, f"--data.init_args.seed={seed}", *extra])).data


def datamodule_of(settings: PipelineSettings) -> DCCCLDataModule:
    """The DataModule of a run's settings, with the fleet's partition."""
    data = snapshot(settings.data) if settings.data is not None else None  # the bytes the stages read
    return load_datamodule(str(data) if data is not None else None, settings.seed_everything,
                           settings.fleet.data_arguments())


def is_rank_zero() -> bool:
    """Whether this process is global rank zero (the one that writes and prints)."""
    return is_global_zero()


class LightningRunner:
    """The stage runner, built when a stage is first resolved or run: importing Lightning takes seconds, and the re-run
    of a finished run needs none of it.

    Args:
        interactive: Whether the output is a terminal (default: whether stderr is one).
        verbose: Print what Lightning prints inside each stage.
    """

    def __init__(self, interactive: Optional[bool] = None, verbose: bool = False) -> None:
        self.interactive = interactive
        self.verbose = verbose
        self._runner: Optional[StageRunner] = None

    @property
    def runner(self) -> StageRunner:
        """The :class:`~dcccl.commands.stage_runner.LightningStageRunner` (built on first use)."""
        if self._runner is None:
            from dcccl.commands.stage_runner import LightningStageRunner

            self._runner = LightningStageRunner(self.interactive, self.verbose)
        return self._runner

    def resolve(self, call: StageCall) -> ResolvedStage:
        """The config the call's stage would run with."""
        return self.runner.resolve(call)

    def __call__(self, call: StageCall, resume: bool) -> None:
        """Run ``call``."""
        self.runner(call, resume)


def pipeline_main(argv: list[str],
                  device_runner: Optional[Callable[[StageRunner], StageRunner]] = None) -> dict[str, Any]:
    """``dcccl pipeline``: parse, check everything before writing, run what must run, print the results.

    ``device_runner`` wraps the stage runner to run the device stages elsewhere (the Flower ServerApp sends them to
    real devices); every other stage runs here. A finished run whose plan is unchanged prints its table without
    importing Lightning, loading the data or writing a file.
    """
    parser = pipeline_parser()
    cfg = parser.parse_args(argv)
    settings = settings_from(parser, cfg)
    local = LightningRunner(verbose=cfg.verbose)
    runner: StageRunner = device_runner(local) if device_runner is not None else local
    plan_run = PlanRun(settings, dcccl_plan(settings), runner, restart_point(cfg), cfg.rerun_changed)
    data = None
    if not plan_run.up_to_date:
        check_stage_names(settings)
        data = datamodule_of(settings).describe()  # loading the data checks it
        plan_run.check(data)  # before anything is written: bad input leaves an existing run directory as it was
        if is_rank_zero():
            atomic_write_text(settings.run.pipeline_config, parser.dump(cfg, skip_none=False))
            if settings.fleet.num_devices > 1:
                write_partition_report(settings.run, data, settings.fleet)
    metrics = plan_run.execute(data)
    if is_rank_zero():
        if wandb_logger_args(settings.trainer.get("logger")) is not None:
            log_run_summary(settings, metrics, yaml.safe_load(parser.dump(cfg, skip_none=False)))
        print(f"\nDC-CCL results ({settings.run.root}):\n{results_table(metrics)}\nmetrics: {settings.run.metrics}")
    return metrics


def check_then_run(command: str, runs: Sequence[tuple[str, int, PlanRun]], data: dict[int, DataDescription],
                   when_checked: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """Check every plan of ``runs`` (its title, seed and run), then run them in order; returns each one's metrics.

    Bad input in any plan is refused before anything is written, as for the pipeline; ``when_checked`` runs once every
    plan passed its checks (a command writes its own config then).
    """
    for _, seed, plan_run in runs:
        plan_run.check(data[seed])
    when_checked()
    results = []
    for title, seed, plan_run in runs:
        log.info("[dcccl %s] seed %d: %s", command, seed, title)
        results.append(plan_run.execute(data[seed]))
    return results
