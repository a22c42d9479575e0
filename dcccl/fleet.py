"""A fleet of devices: who is sampled and online in each round, and which copies each fusion averages.

Everything is a pure function of the seed and the round, so a resumed run makes exactly the choices the
interrupted one made; the copies that latest-update averaging reuses are the files earlier rounds wrote.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from dcccl.fleet_partition import DevicePartitioner

Aggregation = Literal["fedavg", "latest"]


@dataclass
class FleetSpec:
    """How many devices there are, how their data is divided, and who takes part in a round.

    Args:
        num_devices: Number of devices K.
        partitioner: How the device-side samples are divided: ``iid``, ``dirichlet`` or ``by_class``.
        dirichlet_alpha: Concentration of the Dirichlet partitioner (smaller: more skew).
        classes_per_device: For ``by_class``: the classes each device holds.
        sample_fraction: Share of the devices sampled in each round (at least one is sampled).
        availability: Probability that a sampled device is online and reports back.
        availability_schedule: JSON file ``{"<round>": [online device ids], ...}``, replacing ``availability``
            for the rounds it lists.
        aggregation: ``fedavg`` averages the devices that reported this round; ``latest`` (in the spirit of
            FedLaAvg) also keeps every offline device's most recent update (its copy minus the model it
            started from), re-applied to this round's model, so every device's data keeps its weight.
    """

    num_devices: int = 1
    partitioner: DevicePartitioner = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_device: Optional[list[list[int]]] = None
    sample_fraction: float = 1.0
    availability: float = 1.0
    availability_schedule: Optional[Path] = None
    aggregation: Aggregation = "fedavg"

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be at least 1, got {self.num_devices}")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must lie in (0, 1], got {self.sample_fraction}")
        if not 0.0 <= self.availability <= 1.0:
            raise ValueError(f"availability must lie in [0, 1], got {self.availability}")
        self._schedule = self._read_schedule()

    def _read_schedule(self) -> dict[int, set[int]]:
        if self.availability_schedule is None:
            return {}
        raw = json.loads(Path(self.availability_schedule).read_text())
        schedule = {int(round_index): {int(d) for d in devices} for round_index, devices in raw.items()}
        bad = sorted(d for devices in schedule.values() for d in devices if not 0 <= d < self.num_devices)
        if bad:
            raise ValueError(f"availability schedule {self.availability_schedule} names unknown devices {bad}")
        return schedule

    def sampled(self, seed: int, round_index: int) -> list[int]:
        """The devices the cloud asks to train in a round (seeded by seed and round)."""
        count = max(1, math.ceil(self.sample_fraction * self.num_devices))
        rng = np.random.default_rng([seed, round_index, 0])
        return sorted(int(d) for d in rng.choice(self.num_devices, size=count, replace=False))

    def online(self, seed: int, round_index: int) -> set[int]:
        """The devices online in a round: from the schedule, else each with probability ``availability``."""
        if round_index in self._schedule:
            return self._schedule[round_index]
        draws = np.random.default_rng([seed, round_index, 1]).random(self.num_devices)
        return {int(d) for d in np.flatnonzero(draws < self.availability)}

    def reporting(self, seed: int, round_index: int) -> list[int]:
        """The sampled devices that are online: they train and send their copy up."""
        online = self.online(seed, round_index)
        return [d for d in self.sampled(seed, round_index) if d in online]

    def latest_rounds(self, seed: int, round_index: int) -> dict[int, int]:
        """For every device that has ever reported up to ``round_index``: the last round it reported in."""
        latest: dict[int, int] = {}
        for r in range(1, round_index + 1):
            for device in self.reporting(seed, r):
                latest[device] = r
        return latest

    def fused_copies(self, seed: int, round_index: int) -> list[tuple[int, int]]:
        """``(device, round)`` of every device copy the round's fusion averages."""
        if self.aggregation == "fedavg":
            return [(d, round_index) for d in self.reporting(seed, round_index)]
        return sorted(self.latest_rounds(seed, round_index).items())
