"""Generated image folders in the layout the paper's data uses: ``<side>/<class name>/<image>.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_class_images(root: Path, classes: list[str], per_class: int, size: int, seed: int = 0) -> None:
    """``per_class`` small RGB images for each of ``classes`` under ``root``: a colour per class, plus noise."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([(index * 37) % 256, (index * 91) % 256, (index * 53) % 256], dtype=np.int16)
        for image in range(per_class):
            pixels = np.clip(colour + rng.integers(-40, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{image}.png")


def write_paper_folders(root: Path, cloud_classes: int = 1000, device_classes: int = 196, per_class: int = 2,
                        size: int = 16) -> dict[str, Path]:
    """Cloud (ImageNet-like synset names), device (car-model names) and test folders; returns them by side."""
    cloud = [f"n{index:08d}" for index in range(cloud_classes)]
    device = [f"car_{index:03d}" for index in range(device_classes)]
    folders = {side: root / side for side in ("cloud", "device", "test")}
    write_class_images(folders["cloud"], cloud, per_class, size, seed=1)
    write_class_images(folders["device"], device, per_class, size, seed=2)
    write_class_images(folders["test"], cloud + device, 1, size, seed=3)
    return folders
