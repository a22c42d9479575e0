"""Shuffling that a resumed run repeats exactly: each epoch's order depends on the seed and the epoch only."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


class EpochSeededSampler(RandomSampler):
    """A random permutation per epoch, drawn from ``(seed, epoch)`` instead of the global random state.

    A run resumed from a checkpoint at the start of epoch ``e`` therefore sees the same order as a run that
    was never interrupted. The trainer announces each epoch through :meth:`set_epoch`. It stays a
    ``RandomSampler``, so a distributed strategy still replaces it with its own seeded, sharded sampler.

    Args:
        data_source: The dataset to permute.
        seed: Seed of the run.
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from now on."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return super().__iter__()
