"""Stage modules under a real Lightning Trainer: who sees which samples, what stays frozen, what is written."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from datamodules.mnist import BundledMNISTDataModule
from dcccl.artifacts.exports import load_export, load_network, save_export
from dcccl.backbones.spec import BackboneSpec
from dcccl.pipeline.downlink import CloudTensors
from lightning_modules import (
    CloudCoTrainingModule,
    CloudSubmodelModule,
    ControlDistillationModule,
    DeviceCoTrainingModule,
    HeadFinetuneModule,
    ServedModelEvaluation,
)
from tests.conftest import TINY

CLOUD_CLASSES = set(range(7))
DEVICE_CLASSES = {7, 8, 9}


class LabelRecorder(Callback):
    """Records the labels of every training batch."""

    def __init__(self) -> None:
        self.labels: list[int] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.labels += batch[1].tolist()


def snapshot(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of weights and buffers (batch-norm statistics included)."""
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


def assert_identical(before: dict[str, torch.Tensor], network: torch.nn.Module) -> None:
    after = network.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed"


def fit_recording(module: LightningModule, data: BundledMNISTDataModule, factory: Callable[..., Trainer],
                  **trainer_args: Any) -> LabelRecorder:
    recorder = LabelRecorder()
    factory(callbacks=[recorder], **trainer_args).fit(module, datamodule=data)
    return recorder


def test_cloud_stage_sees_only_cloud_samples_and_exports(tmp_path: Path, digits: BundledMNISTDataModule,
                                                         trainer_factory: Callable[..., Trainer]) -> None:
    export = tmp_path / "f.pt"
    module = CloudSubmodelModule(10, 1, backbone=TINY, export_path=str(export))
    recorder = fit_recording(module, digits, trainer_factory, max_steps=20)
    assert set(recorder.labels) <= CLOUD_CLASSES and len(recorder.labels) == 20 * 32
    written = load_export(export, "cloud_submodel")
    assert written.sample_count == 2520  # 7 digits x 360 training samples (40 each held out)
    for key, value in module.cloud_submodel.state_dict().items():
        assert torch.equal(written.state_dict[key], value)


def test_distillation_keeps_teacher_frozen_and_sees_cloud_samples(
    digits: BundledMNISTDataModule, trainer_factory: Callable[..., Trainer], export_factory: Callable[..., Path]
) -> None:
    module = ControlDistillationModule(10, 1, cloud_submodel=str(export_factory("cloud_submodel")), backbone=TINY)
    teacher_before, student_before = snapshot(module.cloud_submodel), snapshot(module.control_model)
    recorder = fit_recording(module, digits, trainer_factory)
    assert set(recorder.labels) <= CLOUD_CLASSES
    assert_identical(teacher_before, module.cloud_submodel)
    assert not module.cloud_submodel.training
    assert not any(torch.equal(student_before[k], v) for k, v in module.control_model.state_dict().items()
                   if v.is_floating_point() and "running" not in k)


def test_kl_distillation_loss_is_zero_for_identical_logits() -> None:
    from lightning_modules.distill import distillation_loss

    logits = torch.randn(4, 10)
    assert distillation_loss(logits, logits, "kl", 4.0).abs() < 1e-6
    assert distillation_loss(logits, logits + 1.0, "mse") == torch.tensor(1.0)


def test_device_stage_never_receives_cloud_submodel_and_sees_only_device_samples(
    tmp_path: Path, digits: BundledMNISTDataModule, trainer_factory: Callable[..., Trainer],
    export_factory: Callable[..., Path],
) -> None:
    cloud_submodel = export_factory("cloud_submodel", seed=1)
    control = export_factory("control_model", seed=2)
    start = export_factory("co_submodel", seed=3)
    export = tmp_path / "device_copy.pt"
    module = DeviceCoTrainingModule(10, 1, control_model=str(control), co_submodel=str(start), export_path=str(export))
    # Its signature has no way to receive the cloud submodel or cloud data.
    assert not any("cloud" in name for name in inspect.signature(DeviceCoTrainingModule).parameters)
    # It holds the two networks sent down, tensor for tensor, and nothing else.
    sent = {"guide": load_export(control).state_dict, "co_submodel": load_export(start).state_dict}
    held = module.state_dict()
    assert held.keys() == {f"{network}.{key}" for network, state in sent.items() for key in state}
    assert all(torch.equal(held[f"{network}.{key}"], value) for network, state in sent.items()
               for key, value in state.items())
    cloud = CloudTensors(load_export(cloud_submodel).state_dict)
    assert cloud.shared_with(held) == []
    # The check sees a cloud tensor where there is one: a co-submodel drawn with the cloud submodel's seed is the cloud
    # submodel, every non-constant tensor of it (constant ones, fresh batch-norm scales and statistics, are left out).
    twin = load_network(export_factory("co_submodel", name="twin", seed=1), "co_submodel").state_dict()
    varying = ["features.0.0.weight", "features.1.0.weight", "head.weight", "head.bias"]
    assert cloud.shared_with(twin) == [(key, key) for key in varying]
    control_before = snapshot(module.control_model)
    recorder = fit_recording(module, digits, trainer_factory)
    assert set(recorder.labels) <= DEVICE_CLASSES
    assert_identical(control_before, module.control_model)
    copy = load_export(export, "co_submodel")
    assert copy.sample_count == 1080  # 3 digits x 360 training samples
    assert copy.class_counts is None  # not asked to report them
    # What goes up is the trained copy: every weight moved away from the start and is exactly the module's own.
    trained = module.co_submodel.state_dict()
    assert copy.state_dict.keys() == trained.keys()
    assert all(torch.equal(copy.state_dict[key], value) for key, value in trained.items())
    assert all(not torch.equal(copy.state_dict[name], sent["co_submodel"][name])
               for name, _ in module.co_submodel.named_parameters())
    assert cloud.shared_with(copy.state_dict) == []


def test_device_stage_refuses_a_cloud_submodel_as_control_model(export_factory: Callable[..., Path]) -> None:
    import pytest

    from dcccl.artifacts.exports import ExportError

    with pytest.raises(ExportError, match="expected a control_model"):
        DeviceCoTrainingModule(10, 1, control_model=str(export_factory("cloud_submodel")))


def test_cloud_round_writes_initial_copy_and_keeps_guide_frozen(
    tmp_path: Path, digits: BundledMNISTDataModule, trainer_factory: Callable[..., Trainer],
    export_factory: Callable[..., Path],
) -> None:
    initial, export = tmp_path / "initial.pt", tmp_path / "cloud_copy.pt"
    torch.manual_seed(5)
    module = CloudCoTrainingModule(10, 1, guide=str(export_factory("cloud_submodel")), co_backbone=TINY,
                                   initial_export_path=str(initial), export_path=str(export))
    start = snapshot(module.co_submodel)
    guide_before = snapshot(module.guide)
    recorder = fit_recording(module, digits, trainer_factory)
    assert set(recorder.labels) <= CLOUD_CLASSES
    assert_identical(guide_before, module.guide)
    for key, value in load_export(initial, "co_submodel").state_dict.items():
        assert torch.equal(value, start[key])  # written before any training step
    cloud_copy = load_export(export, "co_submodel")
    assert cloud_copy.sample_count == 2520 and cloud_copy.class_counts == [360] * 7 + [0] * 3


def _with_buffers(path: Path, shift: float, tracked: int) -> dict[str, torch.Tensor]:
    """Give an export's batch-norm statistics values of its own (as training on its own samples would)."""
    export = load_export(path)
    for key, value in export.state_dict.items():
        if key.endswith("running_mean"):
            export.state_dict[key] = torch.linspace(-1.0, 1.0, value.numel()) + shift
        elif key.endswith("running_var"):
            export.state_dict[key] = torch.linspace(0.5, 2.0, value.numel()) * (1.0 + shift)
        elif key.endswith("num_batches_tracked"):
            export.state_dict[key] = torch.tensor(tracked)
    save_export(export, path)
    return export.state_dict


def test_fusion_step_averages_weights_and_batch_norm_statistics_with_cloud_share(
    tmp_path: Path, export_factory: Callable[..., Path],
) -> None:
    from dcccl.federated.aggregation import FedAvg
    from dcccl.pipeline.fusion import FusionStep

    cloud = export_factory("co_submodel", name="cloud", sample_count=2800, seed=1)
    devices = [export_factory("co_submodel", name=f"d{i}", sample_count=n, seed=2 + i)
               for i, n in enumerate([100, 300])]
    states = [_with_buffers(path, shift, tracked) for path, shift, tracked in
              zip([cloud, *devices], [0.0, 1.0, 2.0], [44, 2, 5])]
    export = tmp_path / "fused.pt"
    step = FusionStep(label="fusion", restart_point="rounds", outputs=(export,), inputs=(cloud, *devices),
                      round_index=1, rule=FedAvg(cloud_share=0.5), cloud_copy=cloud, device_copies=tuple(devices),
                      device_bases=(None, None))
    step.run()
    fused = load_export(export, "co_submodel")
    assert fused.sample_count == 3200
    weights = [0.5, 0.125, 0.375]  # the cloud's share, the rest by 100 : 300 samples
    for key, value in fused.state_dict.items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == 44  # a counter, taken from the cloud's copy, not averaged
        else:
            expected = sum(w * state[key].double() for w, state in zip(weights, states)).to(value.dtype)
            torch.testing.assert_close(value, expected)
    mean = next(key for key in fused.state_dict if key.endswith("running_mean"))
    assert not torch.equal(fused.state_dict[mean], states[0][mean])  # the buffers really were averaged


def test_head_finetuning_trains_only_the_head_on_cloud_samples(
    tmp_path: Path, digits: BundledMNISTDataModule, trainer_factory: Callable[..., Trainer],
    export_factory: Callable[..., Path],
) -> None:
    export = tmp_path / "finetuned.pt"
    module = HeadFinetuneModule(10, 1, co_submodel=str(export_factory("co_submodel", name="c", sample_count=10)),
                                cloud_submodel=str(export_factory("cloud_submodel", seed=2)), export_path=str(export))
    body_before = {k: v for k, v in snapshot(module.co_submodel).items() if not k.startswith("head.")}
    cloud_before = snapshot(module.cloud_submodel)
    head_before = module.co_submodel.head.weight.detach().clone()
    recorder = fit_recording(module, digits, trainer_factory)
    assert recorder.labels and set(recorder.labels) <= CLOUD_CLASSES
    assert_identical(cloud_before, module.cloud_submodel)
    after = module.co_submodel.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in body_before.items())  # BN statistics included
    assert not torch.equal(head_before, module.co_submodel.head.weight)
    written = load_export(export, "co_submodel")
    assert written.sample_count == 10 and torch.equal(written.state_dict["head.weight"], module.co_submodel.head.weight)


def test_head_finetuning_refuses_a_network_without_the_head_api(tmp_path: Path,
                                                                 export_factory: Callable[..., Path]) -> None:
    from dcccl.errors import ConfigError

    plain = BackboneSpec("tests.plain_backbones:sequential_cnn", kwargs={"width": 2})
    co = export_factory("co_submodel", spec=plain, sample_count=10)
    with pytest.raises(ConfigError, match="finetune_head: false"):
        HeadFinetuneModule(10, 1, co_submodel=str(co), cloud_submodel=str(export_factory("cloud_submodel")))


def test_served_logits_are_cloud_plus_co_logits(export_factory: Callable[..., Path]) -> None:
    cloud, co = export_factory("cloud_submodel", seed=1), export_factory("co_submodel", seed=2)
    module = ServedModelEvaluation(10, 1, cloud_submodel=str(cloud), co_submodel=str(co))
    x = torch.randn(5, 1, 28, 28)
    f, h = load_network(cloud, "cloud_submodel").eval(), load_network(co, "co_submodel").eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), f(x) + h(x))


def test_evaluation_writes_accuracy_per_class_group(
    tmp_path: Path, digits: BundledMNISTDataModule, trainer_factory: Callable[..., Trainer],
    export_factory: Callable[..., Path],
) -> None:
    import json

    metrics_path = tmp_path / "metrics.json"
    module = ServedModelEvaluation(10, 1, cloud_submodel=str(export_factory("cloud_submodel")),
                                   co_submodel=str(export_factory("co_submodel")), metrics_path=str(metrics_path))
    logged = trainer_factory().test(module, datamodule=digits, verbose=False)[0]
    written = json.loads(metrics_path.read_text())
    confusion = written.pop("served/confusion_matrix")
    keys = {f"{m}/{k}" for m in ("served", "cloud_only") for k in ("acc", "acc_cloud_classes", "acc_device_classes")}
    assert set(written) == keys
    # Rows are true classes: 100 test digits each; the diagonal holds the correct predictions.
    assert [sum(row) for row in confusion] == [100] * 10
    assert sum(confusion[i][i] for i in range(10)) / 1000 == pytest.approx(written["served/acc"])
    for key in keys:
        assert abs(written[key] - logged[key]) < 1e-6
    # Overall accuracy is the sample-weighted mean of the two groups (700 cloud-class, 300 device-class samples).
    for m in ("served", "cloud_only"):
        mix = 0.7 * written[f"{m}/acc_cloud_classes"] + 0.3 * written[f"{m}/acc_device_classes"]
        assert abs(written[f"{m}/acc"] - mix) < 1e-6
