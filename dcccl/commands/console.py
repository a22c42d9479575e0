"""What a command prints: dcccl's progress lines on the console (global rank zero only), without Lightning's tips or
the warnings about what dcccl does on purpose; bad input in one line."""

from __future__ import annotations

import logging
import warnings

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


def configure_logging() -> None:
    """dcccl's progress lines on the console (global rank zero only), without Lightning's tips or intended warnings."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisements())
    log.addFilter(_RankZeroOnly())
    for intended in _INTENDED_WARNINGS:
        warnings.filterwarnings("ignore", message=intended)
