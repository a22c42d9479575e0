"""A fleet of devices: how the device-side samples are divided, and who is sampled and online in each round.

Everything is a pure function of the seed and the round, so a resumed run makes exactly the choices the
interrupted one made. Which copies a round's fusion averages is the aggregation rule's decision
(:mod:`dcccl.federated.aggregation`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dcccl.config_path import ConfigPath
from dcccl.errors import ConfigError, MissingFileError
from dcccl.federated.partitioners import DevicePartitioner


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
        max_device_samples: The most samples one device's reply may count. A simulated fleet knows each device's
            share from the partition and takes the smaller of the two; on Flower, where a device may train on data
            of its own, this limit is the only one: without it a device may claim any count and take the devices'
            whole weight in the fusion.
    """

    num_devices: int = 1
    partitioner: DevicePartitioner = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_device: Optional[list[list[int]]] = None
    sample_fraction: float = 1.0
    availability: float = 1.0
    availability_schedule: Optional[ConfigPath] = None
    max_device_samples: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_device_samples is not None and self.max_device_samples < 1:
            raise ConfigError(f"fleet max_device_samples must be at least 1, got {self.max_device_samples}")
        if self.num_devices < 1:
            raise ConfigError(f"fleet num_devices must be at least 1, got {self.num_devices}")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ConfigError(f"fleet sample_fraction must lie in (0, 1], got {self.sample_fraction}")
        if not 0.0 <= self.availability <= 1.0:
            raise ConfigError(f"fleet availability must lie in [0, 1], got {self.availability}")
        self._schedule = self._read_schedule()

    def _read_schedule(self) -> dict[int, set[int]]:
        if self.availability_schedule is None:
            return {}
        path = Path(self.availability_schedule)
        if not path.is_file():
            raise MissingFileError(f"availability schedule not found: {path}; fix fleet.availability_schedule")
        raw = json.loads(path.read_text())
        schedule = {int(round_index): {int(d) for d in devices} for round_index, devices in raw.items()}
        bad = sorted(d for devices in schedule.values() for d in devices if not 0 <= d < self.num_devices)
        if bad:
            raise ConfigError(f"availability schedule {self.availability_schedule} names unknown devices {bad}")
        return schedule

    def share_limits(self, device_parts: list[int]) -> tuple[int, ...]:
        """The most samples each device's reply may count: its share of the partition (``device_parts``, empty
        where the cloud does not hold the devices' data), capped by ``max_device_samples``; empty where neither
        is known."""
        if len(device_parts) == self.num_devices:
            cap = self.max_device_samples
            return tuple(part if cap is None else min(part, cap) for part in device_parts)
        if self.max_device_samples is not None:
            return (self.max_device_samples,) * self.num_devices
        return ()

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

    def data_arguments(self) -> dict[str, Any]:
        """DataModule arguments that divide the device-side samples among the fleet (none for one device)."""
        if self.num_devices == 1:
            return {}
        return {"num_devices": self.num_devices, "device_partitioner": self.partitioner,
                "dirichlet_alpha": self.dirichlet_alpha, "classes_per_device": self.classes_per_device}
