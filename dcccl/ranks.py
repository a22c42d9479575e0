"""Which process this is under distributed training, read from the environment launchers set."""

from __future__ import annotations

import os

# The variables Lightning, torchrun and SLURM set, in the order Lightning reads them.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """This process's global rank (0 when not launched as one of several processes)."""
    if "RANK" not in os.environ:
        # Lightning's own multi-node launch sets only LOCAL_RANK and NODE_RANK: rank 0 of node 1 is not global zero.
        node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
        if node != 0:
            return node * 1_000_000 + int(os.environ.get("LOCAL_RANK", "0")) + 1
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            return int(value)
    return 0


def is_global_zero() -> bool:
    """Whether this process writes the run directory's own files (metrics, ledger, fleet state)."""
    return global_rank() == 0


def barrier() -> None:
    """Wait for every process of a distributed run (nothing to wait for when there is only this one).

    Lightning starts the process group at the first distributed stage and keeps it until the program ends, so
    steps that run outside a Trainer (fusion) can wait for global rank zero's writes here.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
