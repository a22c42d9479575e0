"""Which process this is under distributed training, read from the environment launchers set."""

from __future__ import annotations

import os

# The variables Lightning, torchrun and SLURM set, in the order Lightning reads them.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """This process's global rank (0 when not launched as one of several processes)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            return int(value)
    return 0


def is_global_zero() -> bool:
    """Whether this process writes the run directory's own files (metrics, ledger, fleet state)."""
    return global_rank() == 0
