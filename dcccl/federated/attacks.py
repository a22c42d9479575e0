"""Devices that lie, on purpose, in a simulated fleet: to measure what an aggregation rule and the reply checks
withstand.

An attacked device trains as the others do (``label_flip`` excepted: it trains on wrong labels) and then sends a
corrupted reply: its update negated or scaled, noise added, every weight NaN, or a sample count far above what it
holds. Everything is a pure function of the run's seed, so a resumed run attacks as the interrupted one did.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from dcccl.errors import ConfigError

AttackKind = Literal["sign_flip", "scale", "noise", "nan", "inflate_count", "label_flip"]
ATTACK_KINDS: tuple[str, ...] = ("sign_flip", "scale", "noise", "nan", "inflate_count", "label_flip")


@dataclass
class Attack:
    """Which devices lie, and how (simulated fleets: ``dcccl pipeline``; Flower's devices are real).

    Args:
        devices: How many devices are attacked (drawn with the run's seed), or the list of their ids.
        kind: ``sign_flip``: send the start minus ``factor`` times the update; ``scale``: the start plus ``factor``
            times the update; ``noise``: add Gaussian noise of standard deviation ``noise_std`` to every
            parameter; ``nan``: every parameter NaN; ``inflate_count``: report ``factor`` times the samples held
            (and per class); ``label_flip``: train on the labels reversed (class ``c`` as ``C - 1 - c``).
        factor: The update's multiplier (``sign_flip``, ``scale``) or the count's (``inflate_count``).
        noise_std: The noise's standard deviation (``noise``).
    """

    devices: Union[int, list[int]] = 1
    kind: AttackKind = "sign_flip"
    factor: float = 10.0
    noise_std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ConfigError(f"attack kind must be one of {', '.join(ATTACK_KINDS)}, got {self.kind!r}")
        if isinstance(self.devices, int) and self.devices < 0:
            raise ConfigError(f"attack devices must be a number of at least 0 or a list of device ids, got "
                              f"{self.devices}")
        if isinstance(self.devices, list) and any(device < 0 for device in self.devices):
            raise ConfigError(f"attack devices must be device ids of at least 0, got {self.devices}")
        if self.factor <= 0 or self.noise_std < 0:
            raise ConfigError(f"attack factor must be positive and noise_std at least 0, got {self.factor} and "
                              f"{self.noise_std}")

    def attacked(self, num_devices: int, seed: int) -> list[int]:
        """The attacked devices of a fleet of ``num_devices`` (a number of them is drawn with ``seed``).

        Raises:
            ConfigError: More devices, or other ids, than the fleet has.
        """
        if isinstance(self.devices, list):
            unknown = sorted(device for device in self.devices if device >= num_devices)
            if unknown:
                raise ConfigError(f"attack devices {unknown} are not in the fleet of {num_devices} devices")
            return sorted(set(self.devices))
        if self.devices > num_devices:
            raise ConfigError(f"attack devices: {self.devices} of a fleet of {num_devices} devices")
        rng = np.random.default_rng([seed, 7])
        return sorted(int(device) for device in rng.choice(num_devices, size=self.devices, replace=False))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a config holds them."""
        return asdict(self)


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ``c`` as ``num_classes - 1 - c`` (``label_flip``)."""
    return num_classes - 1 - labels


def corrupt_weights(attack: Attack, copy: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                    parameters: Set[str], generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """What an attacked device sends instead of its trained ``copy`` of ``start`` (buffers are left as trained).

    Args:
        attack: The attack.
        copy: The device's honestly trained copy.
        start: The co-submodel it started from.
        parameters: Names of the trainable parameters.
        generator: The random stream of the noise (``noise``).
    """
    corrupted = {}
    for key, value in copy.items():
        if key not in parameters or not value.is_floating_point():
            corrupted[key] = value.clone()
            continue
        update = value - start[key]
        if attack.kind == "sign_flip":
            corrupted[key] = start[key] - attack.factor * update
        elif attack.kind == "scale":
            corrupted[key] = start[key] + attack.factor * update
        elif attack.kind == "noise":
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype) * attack.noise_std
            corrupted[key] = value + noise.to(value.device)
        elif attack.kind == "nan":
            corrupted[key] = torch.full_like(value, float("nan"))
        else:
            corrupted[key] = value.clone()
    return corrupted


def inflate_counts(attack: Attack, sample_count: int, class_counts: Optional[list[int]]
                   ) -> tuple[int, Optional[list[int]]]:
    """The counts an attacked device reports (``inflate_count``: ``factor`` times each, still adding up)."""
    if attack.kind != "inflate_count":
        return sample_count, class_counts
    factor = max(2, int(round(attack.factor)))
    return sample_count * factor, None if class_counts is None else [count * factor for count in class_counts]
