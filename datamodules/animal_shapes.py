"""A real data set that ships offline and is not digits: the silhouettes of ten animals (28x28 grey-scale), from the
``animal-shape-mnist`` package (nothing is downloaded)."""

from __future__ import annotations

import functools
import gzip
import pickle
from importlib import resources
from typing import Any

import numpy as np
import torch

from datamodules.arrays import ArrayDataModule
from dcccl.errors import DataError

ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


@functools.lru_cache(maxsize=1)
def load_animal_shapes() -> tuple[np.ndarray, np.ndarray]:
    """The silhouettes as ``(N, 28, 28)`` uint8 pixels and their labels (0-9, :data:`ANIMALS`), exact duplicates
    dropped (the package holds 10,000 images, 9,716 of them distinct), in the package's order.

    Raises:
        DataError: The package is not installed.
    """
    try:
        folder = resources.files("animal_shape_mnist") / "data" / "Animal Shape"
        with gzip.open(str(folder / "animal_data_version_3.gz")) as pixels_file:
            pixels = np.asarray(pickle.load(pixels_file), dtype=np.uint8)
        with gzip.open(str(folder / "animal_label_version_3.gz")) as labels_file:
            labels = np.asarray(pickle.load(labels_file), dtype=np.int64)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise DataError("the animal silhouettes come from the animal-shape-mnist package: pip install "
                        "'animal-shape-mnist==0.39' (a dcccl dependency; reinstall dcccl)") from err
    _, first = np.unique(pixels.reshape(len(pixels), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return pixels[keep], labels[keep]


@functools.lru_cache(maxsize=1)
def normalised_animal_shapes() -> tuple[torch.Tensor, np.ndarray, float, float]:
    """The silhouettes as normalised ``(N, 1, 28, 28)`` float images, their labels, and the mean and std used."""
    pixels, labels = load_animal_shapes()
    images = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / 255.0
    mean, std = float(images.mean()), float(images.std())
    return (images - mean) / std, labels, mean, std


class AnimalShapesDataModule(ArrayDataModule):
    """Ten animals as white silhouettes on black, 28x28 grey-scale, 812 to 1,000 distinct images per class: a harder
    task than digits (a cat and a dog, a horse and a zebra differ by outline and texture). By default the cloud holds
    bear to giraffe (0-6), the device horse, sheep and zebra (7-9).

    The arguments are :class:`datamodules.arrays.ArrayDataModule`'s.
    """

    @property
    def num_classes(self) -> int:
        """Ten animals."""
        return 10

    @property
    def in_chans(self) -> int:
        """Grey-scale images."""
        return 1

    @property
    def class_names(self) -> list[str]:
        """The animals, by label."""
        return list(ANIMALS)

    def load(self) -> tuple[torch.Tensor, np.ndarray]:
        """The silhouettes (loaded once per process)."""
        images, labels, _, _ = normalised_animal_shapes()
        return images, labels

    def input_description(self) -> dict[str, Any]:
        """28x28 grey-scale silhouettes scaled to [0, 1], then normalised with the data set's mean and std."""
        _, _, mean, std = normalised_animal_shapes()
        return {**super().input_description(), "scale": 1 / 255, "mean": [mean], "std": [std]}
