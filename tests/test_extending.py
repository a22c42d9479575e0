"""The worked examples of docs/extending.md, run as a new user would: a registered builder and stage subclasses."""

from __future__ import annotations

import importlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from datamodules.mnist import BundledMNISTDataModule
from dcccl.artifacts.exports import load_export, load_network
from dcccl.backbones import BackboneSpec, build_backbone, list_backbones
from tests.commands import dcccl as run_dcccl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
TINY_MLP = BackboneSpec("my_backbones:tiny_mlp", kwargs={"hidden": 16})


@pytest.fixture
def my_backbones(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """docs/examples/my_backbones.py, imported the way ``dcccl`` imports it (its folder on ``sys.path``)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("my_backbones")


@pytest.fixture
def my_stages(my_backbones: ModuleType) -> ModuleType:
    """docs/examples/my_stages.py (its folder on ``sys.path``)."""
    return importlib.import_module("my_stages")


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Whether two networks have the same state-dict keys, shapes and values."""
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# ---------------------------------------------------------------------------------------------------------------------
# route 1: a registered builder


@pytest.mark.parametrize("name", ["my_backbones:tiny_mlp", "my_backbones:build_tiny_mlp", "tiny_mlp"])
def test_tiny_mlp_builds_by_every_name_with_timm_head_api_and_gradients(my_backbones: ModuleType, name: str) -> None:
    # The module is imported (by the fixture), so its plain registered key works too.
    assert "tiny_mlp" in list_backbones()
    network = build_backbone(name, num_classes=10, in_chans=1, hidden=16)
    assert type(network) is my_backbones.TinyMLP
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 7, 9])

    logits = network(x)
    assert logits.shape == (4, 10)
    F.cross_entropy(logits, y).backward()
    for param_name, parameter in network.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, param_name

    # timm's head API, from ClassifierHeadMixin
    assert network.num_features == 16
    assert network.get_classifier() is network.head
    features = network.forward_features(x)
    assert features.shape == (4, 16)
    assert torch.equal(network.forward_head(features, pre_logits=True), features)
    assert torch.equal(network.forward_head(features), network(x))
    network.reset_classifier(3)
    assert network(x).shape == (4, 3) and network.get_classifier().out_features == 3


def test_spec_with_builder_path_passes_kwargs_and_rebuilds_the_same_architecture(my_backbones: ModuleType) -> None:
    first, second = TINY_MLP.build(10, 3), TINY_MLP.build(10, 3)
    assert first.body[1].in_features == 3 * 28 * 28 and first.num_features == 16
    assert first.state_dict().keys() == second.state_dict().keys()
    small = BackboneSpec("my_backbones:build_tiny_mlp", kwargs={"image_size": 8, "hidden": 5}).build(4, 1)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_local_checkpoint_loads_and_a_classifier_of_another_size_stays_fresh(
    my_backbones: ModuleType, tmp_path: Path
) -> None:
    source = TINY_MLP.build(7, 1)
    path = tmp_path / "tiny_mlp_7_classes.pt"
    torch.save(source.state_dict(), path)
    with_weights = BackboneSpec(TINY_MLP.name, checkpoint_path=str(path), kwargs=dict(TINY_MLP.kwargs))
    assert _same_weights(with_weights.build(7, 1), source)
    # The head API tells the loader which layer is the classifier: 7 -> 10 classes keeps the body only.
    ten = with_weights.build(10, 1)
    assert torch.equal(ten.body[1].weight, source.body[1].weight)
    assert ten.get_classifier().out_features == 10


# ---------------------------------------------------------------------------------------------------------------------
# route 2: stage subclasses


def test_label_smoothing_cloud_submodel_trains_and_its_export_rebuilds_it(
    my_stages: ModuleType, my_backbones: ModuleType, digits: BundledMNISTDataModule,
    trainer_factory: Callable[..., Trainer], tmp_path: Path,
) -> None:
    export_path = tmp_path / "cloud_submodel.pt"
    module = my_stages.LabelSmoothingCloudSubmodel(10, 1, backbone=TINY_MLP, label_smoothing=0.2,
                                                   export_path=str(export_path))
    before = {key: value.clone() for key, value in module.cloud_submodel.state_dict().items()}
    trainer = trainer_factory(max_steps=2, limit_val_batches=1)
    trainer.fit(module, datamodule=digits)
    assert any(not torch.equal(before[k], v) for k, v in module.cloud_submodel.state_dict().items())

    export = load_export(export_path, "cloud_submodel")
    assert export.backbone == TINY_MLP
    rebuilt = load_network(export_path, "cloud_submodel", num_classes=10)
    assert type(rebuilt) is my_backbones.TinyMLP
    assert _same_weights(rebuilt, module.cloud_submodel)


def test_label_smoothing_is_validated(my_stages: ModuleType) -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        my_stages.LabelSmoothingCloudSubmodel(10, 1, label_smoothing=1.0)


def test_zero_head_co_submodel_is_rebuilt_from_its_exported_spec(
    my_stages: ModuleType, my_backbones: ModuleType, digits: BundledMNISTDataModule,
    trainer_factory: Callable[..., Trainer], export_factory: Callable[..., Path], tmp_path: Path,
) -> None:
    initial, copy = tmp_path / "initial_co_submodel.pt", tmp_path / "cloud_copy.pt"
    module = my_stages.ZeroHeadCloudCoTraining(
        10, 1, guide=str(export_factory("cloud_submodel")), co_backbone=TINY_MLP,
        initial_export_path=str(initial), export_path=str(copy),
    )
    # The build_network() override: the fresh co-submodel's classifier is zero, so f + h starts as f.
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(module.co_submodel(x), torch.zeros(2, 10))
    trainer_factory(max_steps=2, limit_val_batches=1).fit(module, datamodule=digits)

    start = load_network(initial, "co_submodel", num_classes=10)
    assert type(start) is my_backbones.TinyMLP
    assert load_export(initial).backbone == TINY_MLP
    assert all(torch.count_nonzero(p) == 0 for p in start.get_classifier().parameters())
    trained = load_network(copy, "co_submodel", num_classes=10)
    assert _same_weights(trained, module.co_submodel)
    assert torch.count_nonzero(trained.get_classifier().weight) > 0


# ---------------------------------------------------------------------------------------------------------------------
# both routes through the real command, as docs/extending.md runs them


def dcccl(*args: str) -> subprocess.CompletedProcess:
    """``PYTHONPATH=docs/examples dcccl ...`` from the repository root, in a fresh interpreter."""
    return run_dcccl(*args, pythonpath=["docs/examples"])


@pytest.mark.slow
def test_pipeline_with_custom_backbones_and_subclassed_stages(my_backbones: ModuleType, tmp_path: Path) -> None:
    run_dir = tmp_path / "extending"
    co_backbone = json.dumps({"name": "my_backbones:build_tiny_mlp", "kwargs": {"hidden": 32}})
    result = dcccl(
        "pipeline", "--config", "docs/examples/pipeline.yaml", "--run_dir", str(run_dir),
        "--stage_args.cloud_round", json.dumps([f"--model.init_args.co_backbone={co_backbone}"]),
        "--rounds", "1", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["served/acc"] <= 1.0

    # f: the subclassed stage (route 2) with the quickstart's backbone
    assert "my_stages.LabelSmoothingCloudSubmodel" in (run_dir / "cloud" / "config.yaml").read_text()
    assert load_export(run_dir / "cloud" / "cloud_submodel.pt").backbone.name == "small_cnn"
    # g: the registered key, chosen through the pipeline config's stage_args (route 1)
    control = load_export(run_dir / "distill" / "control_model.pt", "control_model")
    assert (control.backbone.name, control.backbone.kwargs) == ("my_backbones:tiny_mlp", {"hidden": 32})
    # h: the builder function, chosen on the command line, built by the subclass's build_network() (both routes)
    initial = load_export(run_dir / "rounds" / "initial_co_submodel.pt", "co_submodel")
    assert initial.backbone.name == "my_backbones:build_tiny_mlp"
    assert all(torch.count_nonzero(initial.state_dict[key]) == 0 for key in ("head.weight", "head.bias"))
    fused = run_dir / "rounds" / "round_001" / "fusion" / "co_submodel.pt"
    assert load_export(fused).backbone.name == "my_backbones:build_tiny_mlp"
    assert type(load_network(fused, "co_submodel", num_classes=10)) is my_backbones.TinyMLP
