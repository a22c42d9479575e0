"""The offline data sets beyond digits: animal silhouettes, and the cross-domain set-up (digits on the cloud, animals
on the device); every data config parses with the stage CLI and builds its DataModule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datamodules import AnimalShapesDataModule, CrossDomainDataModule
from datamodules.animal_shapes import ANIMALS, load_animal_shapes
from datamodules.mnist import MNIST_MEAN, MNIST_STD
from dcccl.commands.pipeline import load_datamodule
from dcccl.errors import ConfigError
from tests.test_configs import print_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _labels(dataset: torch.utils.data.Dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


def test_animal_silhouettes_are_distinct_images_of_ten_animals() -> None:
    pixels, labels = load_animal_shapes()
    assert pixels.shape == (9716, 28, 28) and pixels.dtype == np.uint8  # 10,000 in the package, 284 repeated
    assert len(np.unique(pixels.reshape(len(pixels), -1), axis=0)) == len(pixels)
    assert np.bincount(labels).tolist() == [937, 812, 992, 996, 997, 1000, 1000, 997, 985, 1000]


def test_the_animal_split_gives_the_device_horse_sheep_and_zebra() -> None:
    data = AnimalShapesDataModule()
    assert data.class_names[7:] == ["horse", "sheep", "zebra"] and data.num_classes == 10
    assert set(_labels(data.train_dataset("device"))) == {7, 8, 9}
    assert set(_labels(data.train_dataset("cloud"))) == set(range(7))
    images = torch.stack([data.train_dataset("cloud")[i][0] for i in range(500)])
    assert abs(float(images.mean())) < 0.2 and 0.8 < float(images.std()) < 1.2  # normalised by its own statistics


def test_cross_domain_puts_digits_on_the_cloud_and_animals_on_the_device() -> None:
    data = CrossDomainDataModule(device_animals=["cat", "zebra"], animals_per_class=40)
    assert data.num_classes == 12 and data.class_names[10:] == ["cat", "zebra"]
    device = _labels(data.train_dataset("device"))
    assert set(device) == {10, 11} and set(_labels(data.train_dataset("cloud"))) == set(range(10))
    test = _labels(data.test_dataset())
    assert test.count(10) == test.count(11) == 8  # a fifth of 40 of each animal
    assert len(device) == 2 * 29  # 32 training images of each animal, 3 of them held out for validation
    # The animals are scaled and normalised as the digits are: one preprocessing for every input of the served model.
    pixels, labels = load_animal_shapes()
    sample = data.train_dataset("device")[0][0]
    raw = sample * MNIST_STD + MNIST_MEAN
    assert torch.allclose(raw * 255, torch.round(raw * 255), atol=1e-3)
    assert any(np.array_equal(np.round(raw[0].numpy() * 255).astype(np.uint8), pixels[i])
               for i in np.flatnonzero(labels == ANIMALS.index("cat" if device[0] == 10 else "zebra")))


@pytest.mark.parametrize("kwargs, message", [
    ({"device_animals": ["unicorn"]}, "must name distinct animals"),
    ({"device_animals": ["cat", "cat"]}, "must name distinct animals"),
    ({"animals_per_class": 5000}, "ask for fewer"),
])
def test_bad_cross_domain_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CrossDomainDataModule(**kwargs).train_dataset("device")


@pytest.mark.parametrize("path", sorted((CONFIGS / "data").glob("*.yaml")), ids=lambda p: p.name)
def test_every_data_config_parses_and_builds_its_data(path: Path) -> None:
    resolved = print_config(["fit", "--config", str(path), "--config", str(CONFIGS / "stages/cloud.yaml")])
    section = yaml.safe_load(path.read_text())["data"]
    assert resolved["data"]["class_path"] == section["class_path"]
    module_name, class_name = section["class_path"].rsplit(".", 1)
    data = getattr(__import__(module_name, fromlist=[class_name]), class_name)(**section.get("init_args", {}))
    assert len(data.train_dataset("cloud")) > 0 and len(data.train_dataset("device")) > 0
    # What a pipeline builds from the file (parsed over the default data section) is the same split.
    loaded = load_datamodule(str(path), 0)
    assert type(loaded) is type(data) and loaded.split_spec == data.split_spec  # type: ignore[attr-defined]
