"""Random streams that a resumed run repeats exactly: each epoch's order depends on the seed and the epoch only; each
device's stream (dropout, augmentation drawn on the main process) on the seed, the round and the device only."""

from __future__ import annotations

import hashlib
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


def device_seed(seed: int, round_index: int, device: int) -> int:
    """The seed of ``device``'s random stream in ``round_index`` of a run seeded ``seed``.

    A hash, so that no two (seed, round, device) share a stream and none is one of the shuffling streams
    (``seed * 1_000_003 + epoch``) by construction of a linear formula. It seeds what the device draws on the process
    that trains it (dropout, random augmentation in the main process); DataLoader workers draw from their own seeds.
    """
    digest = hashlib.blake2b(f"dcccl-device/{seed}/{round_index}/{device}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
