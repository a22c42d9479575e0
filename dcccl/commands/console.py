"""What a command prints: dcccl's progress lines (global rank zero only), without Lightning's tips or the warnings
about what dcccl does on purpose.

On a terminal a run shows one progress display at the bottom (the step it is on, the steps done, the devices of a
device round, the elapsed and the estimated time left) and its progress lines above it; elsewhere (a log file, CI)
it prints the same lines, one per event, each finished step with its time so far and the time left.
"""

from __future__ import annotations

import atexit
import logging
import sys
import warnings
from typing import Any, Optional

from dcccl.pipeline.progress import DEVICES_FIELD, PROGRESS_FIELD, format_seconds
from dcccl.ranks import is_global_zero

log = logging.getLogger("dcccl")

# Warnings about things dcccl does on purpose: frozen guides in eval mode.
_INTENDED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


class _RankZeroOnly(logging.Filter):
    """Under DDP every process runs the pipeline; only global rank zero reports progress."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_global_zero()


class _DropAdvertisements(logging.Filter):
    """Drops Lightning's product tips from the console; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


class ProgressDisplay(logging.Handler):
    """One progress bar for the whole run at the bottom of a terminal, every log line printed above it.

    It reads what the coordinator's progress lines carry (:data:`~dcccl.pipeline.progress.PROGRESS_FIELD`) and the
    device round's (:data:`~dcccl.pipeline.progress.DEVICES_FIELD`); other lines are printed as they come.

    Args:
        console: Where it draws (a ``rich`` console; default: stderr).
    """

    def __init__(self, console: Optional[Any] = None) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console if console is not None else Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[steps]}"),
                            TimeElapsedColumn(), TextColumn("{task.fields[left]}"), console=self.console,
                            transient=True)
        self.task: Optional[Any] = None
        self.label = ""
        atexit.register(self.close)

    def emit(self, record: logging.LogRecord) -> None:
        """Print the line above the bar; move the bar on when the line says how far the run is."""
        try:
            progress = getattr(record, PROGRESS_FIELD, None)
            devices = getattr(record, DEVICES_FIELD, None)
            if progress is not None:
                self._step(progress)
            elif devices is not None and self.task is not None:
                done, total = devices
                self.bar.update(self.task, description=f"{self.label}: device {done}/{total}")
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # a display must never stop a run
            self.handleError(record)

    def _step(self, progress: dict[str, Any]) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("", total=max(progress["runs"], 1), steps="", left="")
        left = progress["left"]
        self.label = f"step {progress['position']}/{progress['total']} {progress['label']}"
        self.bar.update(self.task, description=self.label, completed=progress["done"],
                        steps=f"{progress['done']}/{progress['runs']} to run",
                        left="" if left is None else f"about {format_seconds(left)} left")
        if progress["done"] >= progress["runs"] and progress["position"] >= progress["total"]:
            self.close()

    def close(self) -> None:
        """Take the bar off the terminal (the lines printed above it stay)."""
        if self.task is not None:
            self.bar.stop()
            self.task = None
        super().close()


def configure_logging(verbose: bool = False, terminal: Optional[bool] = None) -> None:
    """dcccl's progress lines (global rank zero only), without Lightning's tips or intended warnings; on a terminal
    (default: whether stderr is one), unless ``verbose``, with the run's progress display."""
    terminal = sys.stderr.isatty() if terminal is None else terminal
    if terminal and not verbose and is_global_zero():
        display = ProgressDisplay()
        display.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[display])
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisements())
    log.addFilter(_RankZeroOnly())
    for intended in _INTENDED_WARNINGS:
        warnings.filterwarnings("ignore", message=intended)
