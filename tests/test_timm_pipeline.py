"""The paper-scale options: pretrained timm weights from the local Hugging Face cache, networks that normalise their
own input, timm's image pipelines and augmentation for image folders, loader defaults, and the speed callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch import Trainer
from safetensors.torch import save_file

from datamodules import ImageFolderDataModule
from datamodules.transforms import TrainAugmentation
from dcccl.backbones.builders import MissingPretrainedWeightsError, check_backbone
from dcccl.backbones.normalized import NormalizedInput
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.reporting.plots import plot_confusion_matrix
from lightning_modules import ChannelsLast, CloudSubmodelModule, CompileNetworks
from tests.image_folders import write_class_images

TIMM_NAME = "mobilenetv3_small_050.lamb_in1k"


def fill_hub_cache(cache: Path, name: str, state: dict[str, torch.Tensor]) -> None:
    """Lay ``state`` out as the hub cache holds timm's weights for ``name``
    (refs/main -> snapshot/model.safetensors)."""
    repo = cache / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(snapshot / "model.safetensors"))


def test_pretrained_weights_come_from_the_local_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingPretrainedWeightsError, match=f"huggingface-cli download timm/{TIMM_NAME}"):
        check_backbone(TIMM_NAME, pretrained=True)
    reference = timm.create_model(TIMM_NAME, pretrained=False)  # 1,000 classes, as published
    fill_hub_cache(tmp_path, TIMM_NAME, reference.state_dict())
    check_backbone(TIMM_NAME, pretrained=True)
    network = BackboneSpec(TIMM_NAME, pretrained=True).build(num_classes=7, in_chans=3)
    torch.testing.assert_close(network.conv_stem.weight, reference.conv_stem.weight)  # the cached weights
    assert network.get_classifier().out_features == 7  # a classifier of another size starts afresh


def test_a_network_that_normalises_its_own_input_exports_with_its_normalisation(tmp_path: Path) -> None:
    from dcccl.artifacts.exports import NetworkExport, load_export, save_export

    spec = BackboneSpec(TIMM_NAME, normalize=True)
    network = spec.build(5, 3).eval()
    assert isinstance(network, NormalizedInput)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(network(x), network.network((x - mean) / std))
    assert all(key.startswith("network.") for key in network.state_dict())  # the statistics are not weights
    save_export(NetworkExport.of(network, "co_submodel", spec, 5, 3, 10), tmp_path / "h.pt")
    rebuilt = load_export(tmp_path / "h.pt").build().eval()
    torch.testing.assert_close(rebuilt(x), network(x))
    assert network.get_classifier() is network.network.get_classifier()  # timm's head API passes through


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, str]:
    write_class_images(tmp_path / "cloud", ["a", "b"], 4, 40, seed=1)
    write_class_images(tmp_path / "device", ["c"], 4, 40, seed=2)
    write_class_images(tmp_path / "test", ["a", "b", "c"], 2, 40, seed=3)
    return {f"{side}_dir": str(tmp_path / side) for side in ("cloud", "device", "test")}


def test_timm_pipeline_crops_as_the_data_config_says_and_augments_only_training(folders: dict[str, str]) -> None:
    data = ImageFolderDataModule(**folders, image_size=24, pipeline="timm", data_config=TIMM_NAME, normalize=False,
                                 augment=TrainAugmentation(scale=(0.2, 1.0), auto_augment="rand-m9-mstd0.5"),
                                 val_fraction=0.25, num_workers=0)
    assert data.augments_training
    description = data.input_description()
    assert description["resize"] == {"shorter_side": int(24 / 0.875), "center_crop": 24, "interpolation": "bicubic"}
    assert "mean" not in description  # the networks normalise their own input
    train, val = data.train_dataset("cloud"), data.val_dataset("cloud")
    first, again = train[0][0], train[0][0]
    assert first.shape == (3, 24, 24) and first.dtype == torch.float32
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert not torch.equal(first, again)  # augmented afresh each time
    assert torch.equal(val[0][0], val[0][0])  # validation is not augmented
    assert len(train) + len(val) == 8


def test_timm_pipeline_options_are_checked(folders: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="set pipeline: timm"):
        ImageFolderDataModule(**folders, augment=TrainAugmentation())
    with pytest.raises(ConfigError, match="not a timm model"):
        ImageFolderDataModule(**folders, pipeline="timm", data_config="no_such_net")
    with pytest.raises(ConfigError, match="set channels: 3"):
        ImageFolderDataModule(**folders, pipeline="timm", channels=1)


def test_loader_defaults_suit_the_data(folders: dict[str, str]) -> None:
    data = ImageFolderDataModule(**folders)
    assert 1 <= data.num_workers <= 8
    assert data.pin_memory == torch.cuda.is_available()
    loader = data.sequential_loader(data.test_dataset())
    assert loader.num_workers == data.num_workers and loader.persistent_workers


def test_a_large_confusion_matrix_is_drawn_at_a_readable_size(tmp_path: Path) -> None:
    from PIL import Image

    matrix = torch.eye(1196, dtype=torch.int64).tolist()
    plot_confusion_matrix(matrix, tmp_path / "cm.png")
    width, height = Image.open(tmp_path / "cm.png").size
    assert width <= 1500 and height <= 1500


def cloud_stage(callbacks: list[object], root: Path, digits_module: object) -> CloudSubmodelModule:
    torch.manual_seed(0)
    module = CloudSubmodelModule(10, 1, backbone=BackboneSpec("small_cnn", kwargs={"width": 4}))
    Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root),
            callbacks=callbacks).fit(module, datamodule=digits_module)  # type: ignore[arg-type]
    return module


@pytest.mark.parametrize("callback", [ChannelsLast(), CompileNetworks(backend="eager")],
                         ids=["channels_last", "compile"])
def test_speed_callbacks_keep_the_stage_s_results(tmp_path: Path, digits: object, callback: object) -> None:
    plain = cloud_stage([], tmp_path / "plain", digits)
    fast = cloud_stage([callback], tmp_path / "fast", digits)
    network = fast.cloud_submodel
    if isinstance(callback, ChannelsLast):
        conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    else:
        assert network._compiled_call_impl is not None  # compiled in place
    assert fast.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, rtol=1e-4, atol=1e-5)
