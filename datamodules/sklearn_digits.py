"""A second real data set that ships offline: scikit-learn's 1,797 handwritten digits (8x8 grey-scale, UCI)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from datamodules.arrays import ArrayDataModule


@functools.lru_cache(maxsize=1)
def load_sklearn_digits() -> tuple[torch.Tensor, np.ndarray, float, float]:
    """The digits as normalised ``(N, 1, 8, 8)`` float images, their labels, and the mean and std used."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    mean, std = float(images.mean()), float(images.std())
    return (images - mean) / std, np.asarray(digits.target, dtype=np.int64), mean, std


class SklearnDigitsDataModule(ArrayDataModule):
    """scikit-learn's digits: about 180 per class, 8x8 grey-scale, pixel values 0-16 (read from the installed
    package; nothing is downloaded). By default the cloud holds 0-6, the device 7-9.

    The arguments are :class:`datamodules.arrays.ArrayDataModule`'s.
    """

    @property
    def num_classes(self) -> int:
        """Ten digits."""
        return 10

    @property
    def in_chans(self) -> int:
        """Grey-scale images."""
        return 1

    def load(self) -> tuple[torch.Tensor, np.ndarray]:
        """The digits (loaded once per process)."""
        images, labels, _, _ = load_sklearn_digits()
        return images, labels

    def input_description(self) -> dict[str, Any]:
        """8x8 grey-scale digits scaled to [0, 1] (pixel / 16), then normalised with the data set's mean and std."""
        _, _, mean, std = load_sklearn_digits()
        return {**super().input_description(), "scale": 1 / 16, "mean": [mean], "std": [std]}
