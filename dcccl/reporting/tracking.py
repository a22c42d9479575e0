"""Weights & Biases around the pipeline: offline when it must be, one run per stage, a summary run per pipeline.

A stage's W&B run is opened by Lightning's ``WandbLogger``; dcccl only names it, through the environment
variables W&B documents (``WANDB_RUN_GROUP``, ``WANDB_JOB_TYPE``, ``WANDB_NAME``), so whatever else the user
configures on the logger stays theirs. ``wandb`` itself is imported only when a W&B logger is configured.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlparse

if TYPE_CHECKING:
    from dcccl.pipeline.settings import PipelineSettings

log = logging.getLogger("dcccl")

DEFAULT_PROJECT = "dcccl"


def _logger_entries(logger: Any) -> Iterator[Any]:
    yield from (logger if isinstance(logger, list) else [logger])


def _class_name(entry: Any) -> str:
    class_path = entry.get("class_path") if isinstance(entry, dict) else entry
    return class_path.split(".")[-1] if isinstance(class_path, str) else ""


def _is_wandb_entry(entry: Any) -> bool:
    return _class_name(entry) == "WandbLogger"


def wandb_logger_args(logger: Any) -> Optional[dict[str, Any]]:
    """The init arguments of the W&B logger in a trainer's ``logger`` option, or ``None`` if it has none.

    ``logger`` is the option as written in a config or on the command line: ``WandbLogger``, a
    ``{class_path, init_args}`` dict, a list of those, or a boolean.
    """
    for entry in _logger_entries(logger):
        if _is_wandb_entry(entry):
            return dict(entry.get("init_args") or {}) if isinstance(entry, dict) else {}
    return None


def with_save_dirs(logger: Any, wandb_dir: str | Path, stage_dir: str | Path) -> Any:
    """``logger`` with a directory for every logger that names none: W&B runs under ``wandb_dir`` (one place
    for all of a pipeline's runs), TensorBoard and CSV logs under ``stage_dir``."""
    defaults = {"WandbLogger": str(wandb_dir), "TensorBoardLogger": str(stage_dir), "CSVLogger": str(stage_dir)}
    entries = []
    for entry in _logger_entries(logger):
        name = _class_name(entry)
        if name in defaults:
            init_args = dict(entry.get("init_args") or {}) if isinstance(entry, dict) else {}
            if not init_args.get("save_dir") and not init_args.get("dir"):
                init_args["save_dir"] = defaults[name]
            class_path = entry["class_path"] if isinstance(entry, dict) else entry
            entry = {"class_path": class_path if "." in class_path else f"lightning.pytorch.loggers.{name}",
                     "init_args": init_args}
        entries.append(entry)
    return entries if isinstance(logger, list) else entries[0]


def _api_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def has_api_key() -> bool:
    """Whether a W&B API key is available (``WANDB_API_KEY`` or a netrc entry for the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(_api_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def can_reach_wandb(timeout: float = 2.0) -> bool:
    """Whether the W&B host accepts a connection within ``timeout`` seconds."""
    try:
        with socket.create_connection((_api_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False


def prepare_wandb_environment() -> str:
    """Choose the W&B mode before any run starts; never blocks on a login prompt.

    An explicit ``WANDB_MODE`` is kept. Otherwise, without an API key or without a connection to the W&B
    host, runs are written offline (upload them later with ``wandb sync``). The project defaults to
    ``dcccl`` unless ``WANDB_PROJECT`` or the logger's ``project`` says otherwise.

    Returns:
        The mode in effect (``online``, ``offline``, ``disabled``...).
    """
    os.environ.setdefault("WANDB_PROJECT", DEFAULT_PROJECT)
    if "WANDB_MODE" not in os.environ:
        reason = None if has_api_key() else "no W&B API key found"
        if reason is None and not can_reach_wandb():
            reason = f"{_api_host()} cannot be reached"
        if reason is not None:
            os.environ["WANDB_MODE"] = "offline"
            os.environ.setdefault("WANDB_SILENT", "true")  # one line here instead of W&B's own per-run notes
            log.info("[dcccl] W&B: %s, logging offline; upload later with `wandb sync <dir>/wandb/offline-run-*`",
                     reason)
        else:
            os.environ["WANDB_MODE"] = "online"
    return os.environ["WANDB_MODE"]


def name_next_wandb_run(group: str, job_type: str, name: str) -> None:
    """Group, job type and name of the next W&B run this process opens."""
    os.environ.update(WANDB_RUN_GROUP=group, WANDB_JOB_TYPE=job_type, WANDB_NAME=name)


def finish_wandb_run() -> None:
    """Close the W&B run this process has open, if any, so the next stage opens its own.

    W&B reads its environment once per session; ending the session (``wandb.teardown``) lets the next run
    take the name, group and job type set for it.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
        wandb.teardown()


def log_pipeline_summary(metrics: dict[str, Any], config: dict[str, Any], group: str, save_dir: str | Path,
                         project: Optional[str] = None, plots: tuple[Path, ...] = ()) -> None:
    """One W&B run for the whole pipeline: served accuracy and transfers per round, totals and plots.

    Args:
        metrics: The pipeline's ``metrics.json`` content.
        config: The resolved pipeline config.
        group: The pipeline's run name (the group of its stages' runs).
        save_dir: Where W&B writes the run (its ``wandb/`` folder is created there).
        project: W&B project (default: ``WANDB_PROJECT``).
        plots: PNG files to attach as images.
    """
    import wandb

    prepare_wandb_environment()  # every stage may have been skipped, so no stage chose the mode yet
    finish_wandb_run()
    run = wandb.init(project=project, group=group, job_type="pipeline", name=f"{group}/summary",
                     dir=str(save_dir), config=config)
    run.define_metric("round")
    run.define_metric("served/*", step_metric="round")
    run.define_metric("transfers/*", step_metric="round")
    per_round = metrics.get("transfers/per_round", {})
    downlink = uplink = 0
    for entry in metrics["rounds"]:
        transfers = per_round.get(str(entry["round"]), {})
        downlink += transfers.get("downlink_bytes", 0)
        uplink += transfers.get("uplink_bytes", 0)
        run.log({**{k: v for k, v in entry.items() if isinstance(v, (int, float))},
                 "transfers/downlink_bytes": downlink, "transfers/uplink_bytes": uplink})
    images = {f"plots/{path.stem}": wandb.Image(str(path)) for path in plots if path.is_file()}
    if images:
        run.log(images)
    for key in ("served/acc", "transfers/downlink_bytes", "transfers/uplink_bytes"):
        if key in metrics:
            run.summary[key] = metrics[key]
    run.finish()
    wandb_dir = Path(save_dir) / "wandb"
    if os.environ.get("WANDB_MODE") == "offline":
        log.info("[dcccl] W&B: offline runs of group %r in %s; upload with: wandb sync %s/offline-run-*",
                 group, wandb_dir, wandb_dir)
    else:
        log.info("[dcccl] W&B: runs of group %r logged to project %r", group, run.project)


def log_run_summary(settings: PipelineSettings, metrics: dict[str, Any], config: dict[str, Any]) -> None:
    """:func:`log_pipeline_summary` of a run with a W&B logger: its directory, project and plots."""
    logger = wandb_logger_args(settings.trainer.get("logger")) or {}
    run = settings.run
    log_pipeline_summary(metrics, config, settings.name, logger.get("save_dir") or logger.get("dir") or run.root,
                         logger.get("project"), (run.accuracy_plot, run.confusion_plot))
