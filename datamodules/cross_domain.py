"""Device classes from another domain than the cloud's, as in the paper (ImageNet on the cloud, Stanford Cars on the
device): the cloud holds the ten bundled MNIST digits, the device a few animals drawn as silhouettes."""

from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np
import torch

from datamodules.animal_shapes import ANIMALS, load_animal_shapes
from datamodules.arrays import ArrayDataModule
from datamodules.mnist import MNIST_MEAN, MNIST_STD, load_bundled_digits
from dcccl.errors import ConfigError

DIGITS = tuple(f"digit_{d}" for d in range(10))


@functools.lru_cache(maxsize=4)
def animal_subset(animals: tuple[str, ...], per_class: int) -> tuple[torch.Tensor, np.ndarray]:
    """``per_class`` silhouettes of each of ``animals`` (a fixed draw: it defines the data set), normalised as the
    bundled digits are, labelled 10, 11, ... in the order given."""
    pixels, labels = load_animal_shapes()
    draw = np.random.default_rng(0)
    chosen, new_labels = [], []
    for position, animal in enumerate(animals):
        of_class = np.flatnonzero(labels == ANIMALS.index(animal))
        if per_class > len(of_class):
            raise ConfigError(f"animals_per_class is {per_class} but the data set holds {len(of_class)} {animal} "
                              "images: ask for fewer")
        chosen.append(np.sort(draw.choice(of_class, per_class, replace=False)))
        new_labels.append(np.full(per_class, 10 + position, dtype=np.int64))
    images = torch.as_tensor(pixels[np.concatenate(chosen)], dtype=torch.float32).unsqueeze(1) / 255.0
    return (images - MNIST_MEAN) / MNIST_STD, np.concatenate(new_labels)


class CrossDomainDataModule(ArrayDataModule):
    """The cloud's classes are the ten bundled MNIST digits (labels 0-9, 500 each); the device's are animals drawn
    as silhouettes (labels 10, 11, ..., ``animals_per_class`` each), a domain the cloud submodel never saw, with fewer
    samples per class, as the paper's Stanford Cars beside ImageNet. Every image is scaled to [0, 1] and normalised
    with MNIST's mean and std: the served model preprocesses all its inputs alike.

    Args:
        device_animals: The animals the device holds (of bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep,
            zebra).
        animals_per_class: Silhouettes of each animal in the data set (train and test together).
        cloud_classes: The digits 0-9 (``null``: the same).
        device_classes: ``null``: every animal (10, 11, ...).
        kwargs: The other arguments of :class:`datamodules.arrays.ArrayDataModule`.
    """

    def __init__(self, device_animals: list[str] = ["cat", "dog", "horse", "sheep", "zebra"],  # noqa: B006
                 animals_per_class: int = 150,
                 cloud_classes: Optional[list[int]] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # noqa: B006
                 device_classes: Optional[list[int]] = None, **kwargs: Any) -> None:
        unknown = [animal for animal in device_animals if animal not in ANIMALS]
        if unknown or not device_animals or len(set(device_animals)) != len(device_animals):
            raise ConfigError(f"device_animals must name distinct animals of {', '.join(ANIMALS)}; got "
                              f"{device_animals}")
        if animals_per_class < 2:
            raise ConfigError(f"animals_per_class must be at least 2 (a train and a test image), got "
                              f"{animals_per_class}")
        self.device_animals = tuple(device_animals)
        self.animals_per_class = animals_per_class
        super().__init__(
            cloud_classes=list(range(10)) if cloud_classes is None else cloud_classes,
            device_classes=list(range(10, self.num_classes)) if device_classes is None else device_classes,
            **kwargs)

    @property
    def num_classes(self) -> int:
        """Ten digits and the device's animals."""
        return 10 + len(self.device_animals)

    @property
    def in_chans(self) -> int:
        """Grey-scale images."""
        return 1

    @property
    def class_names(self) -> list[str]:
        """``digit_0`` ... ``digit_9``, then the animals."""
        return [*DIGITS, *self.device_animals]

    def load(self) -> tuple[torch.Tensor, np.ndarray]:
        """The digits, then the animals."""
        digits, digit_labels = load_bundled_digits()
        animals, animal_labels = animal_subset(self.device_animals, self.animals_per_class)
        return torch.cat([digits, animals]), np.concatenate([digit_labels, animal_labels])

    def input_description(self) -> dict[str, Any]:
        """28x28 grey-scale images scaled to [0, 1], then normalised with MNIST's mean and std."""
        return {**super().input_description(), "scale": 1 / 255, "mean": [MNIST_MEAN], "std": [MNIST_STD]}
