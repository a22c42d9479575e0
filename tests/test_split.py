"""Vertical splitting: exactness on block-diagonal bases, widths, errors, exports and pipeline wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dcccl.artifacts.exports import NetworkExport, load_network, save_export
from dcccl.backbones import ClassifierHeadMixin, SmallCNN, build_backbone
from dcccl.backbones.split import SplitSpec
from dcccl.federated.costs import parameter_count
from dcccl.model.vertical_split import (
    UnsupportedLayerError,
    channel_slice,
    co_channel_count,
    split_model,
    zero_cross_group_weights,
)

FAMILIES = [
    ("small_cnn", {"width": 32}, 0.25, 28),  # plain sequential VGG-like CNN (the quickstart's)
    ("resnet10t", {}, 0.25, 32),  # basic blocks, deep stem, downsampling shortcuts
    ("resnet26", {}, 0.125, 32),  # bottleneck blocks
    ("mobilenetv3_small_050", {}, 0.25, 48),  # depthwise convolutions, squeeze-excitation, conv head
    ("efficientnet_b0", {}, 0.125, 32),  # depthwise convolutions, squeeze-excitation, BatchNormAct2d
]


def randomise_batch_norm(network: nn.Module) -> None:
    """Non-trivial running statistics, so that exactness also covers their slicing."""
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)


@pytest.mark.parametrize(("name", "kwargs", "ratio", "size"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_block_diagonal_base_equals_sum_of_its_parts(name: str, kwargs: dict, ratio: float, size: int) -> None:
    torch.manual_seed(0)
    base = build_backbone(name, num_classes=10, in_chans=3, **kwargs)
    x = torch.randn(3, 3, size, size)
    zero_cross_group_weights(base, ratio, x)
    randomise_batch_norm(base)
    cloud, co = split_model(base, ratio, x)
    for network in (base, cloud, co):
        network.eval()
    with torch.no_grad():
        expected, got = base(x), cloud(x) + co(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # Every parameter of the base lands in exactly one part or is a dropped cross-group weight.
    assert parameter_count(cloud) + parameter_count(co) < parameter_count(base)


def test_without_block_diagonal_weights_the_parts_differ_from_the_base() -> None:
    torch.manual_seed(0)
    base = SmallCNN(10, in_chans=1, width=16).eval()
    cloud, co = split_model(base, 0.25, torch.zeros(2, 1, 28, 28))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(base(x), cloud.eval()(x) + co.eval()(x), atol=1e-4)


def test_parts_have_the_expected_widths() -> None:
    base = SmallCNN(10, in_chans=1, width=32)  # channels 32, 64, 128
    cloud, co = split_model(base, 0.25, torch.zeros(2, 1, 28, 28))
    # The co-submodel is exactly a width-8 SmallCNN (8, 16, 32 channels), the cloud one a width-24 SmallCNN.
    assert parameter_count(co) == parameter_count(SmallCNN(10, in_chans=1, width=8))
    assert parameter_count(cloud) == parameter_count(SmallCNN(10, in_chans=1, width=24))
    assert [m.out_channels for m in co.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 32]
    assert co.num_features == 32 and cloud.num_features == 96
    assert co.get_classifier().in_features == 32 and co.get_classifier().out_features == 10
    assert torch.count_nonzero(co.get_classifier().bias) == 0  # the cloud submodel keeps the bias
    assert torch.equal(cloud.get_classifier().bias, base.get_classifier().bias)


def test_parts_are_initialised_from_the_base_weights_and_the_base_is_untouched() -> None:
    torch.manual_seed(0)
    base = SmallCNN(10, in_chans=1, width=16)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cloud, co = split_model(base, 0.25, torch.zeros(2, 1, 28, 28))
    first_conv = base.features[0][0].weight
    assert torch.equal(cloud.features[0][0].weight, first_conv[:12])  # reads all input channels
    assert torch.equal(co.features[0][0].weight, first_conv[12:])
    assert torch.equal(co.features[1][0].weight, base.features[1][0].weight[24:, 12:])
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_channel_groups_by_hand() -> None:
    assert co_channel_count(64, 0.125) == 8
    assert co_channel_count(3, 0.1) == 1  # at least one channel each
    assert co_channel_count(2, 0.9) == 1
    assert channel_slice(64, 0.125, "cloud") == slice(0, 56) and channel_slice(64, 0.125, "co") == slice(56, 64)
    with pytest.raises(ValueError):
        co_channel_count(64, 1.0)
    with pytest.raises(ValueError):
        co_channel_count(1, 0.5)


class _WithLayerNorm(ClassifierHeadMixin, nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.num_features = 8
        self.head = nn.Linear(8, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).mean((2, 3))


class _Grouped(_WithLayerNorm):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Conv2d(8, 8, 1, groups=2)


def test_unsupported_layers_are_named() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"'norm' \(GroupNorm\)"):
        split_model(_WithLayerNorm(), 0.25, torch.zeros(1, 1, 8, 8))
    with pytest.raises(UnsupportedLayerError, match=r"'norm': grouped Conv2d with groups=2"):
        split_model(_Grouped(), 0.25, torch.zeros(1, 1, 8, 8))
    headless = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    with pytest.raises(UnsupportedLayerError, match="get_classifier"):
        split_model(headless, 0.25, torch.zeros(1, 1, 8, 8))


def test_split_backbone_spec_rebuilds_from_an_export_without_the_base_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base_file = tmp_path / "base.pth"
    torch.save(SmallCNN(10, in_chans=1, width=16).state_dict(), base_file)
    spec = SplitSpec(base=__import__("dcccl").backbones.BackboneSpec(
        "small_cnn", checkpoint_path=str(base_file), kwargs={"width": 16}), ratio=0.25, input_size=28)
    co = spec.part("co").build(10, 1)
    expected = split_model(build_backbone("small_cnn", 10, 1, checkpoint_path=base_file, width=16), 0.25,
                           torch.zeros(2, 1, 28, 28))[1]
    assert all(torch.equal(a, b) for a, b in zip(co.state_dict().values(), expected.state_dict().values()))
    export = save_export(NetworkExport.of(co, "co_submodel", spec.part("co"), 10, 1), tmp_path / "co.pt")
    base_file.unlink()  # the export carries the weights: the base file is no longer needed
    rebuilt = load_network(export, "co_submodel").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), co.eval()(x))


def test_lightning_checkpoint_as_base_weights(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from datamodules.mnist import BundledMNISTDataModule
    from dcccl.backbones import BackboneSpec
    from lightning_modules import CloudSubmodelModule

    module = CloudSubmodelModule(10, 1, backbone=BackboneSpec("small_cnn", kwargs={"width": 8}))
    trainer = Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=BundledMNISTDataModule())
    checkpoint = tmp_path / "base.ckpt"
    trainer.save_checkpoint(checkpoint)
    loaded = build_backbone("small_cnn", 10, 1, checkpoint_path=checkpoint, width=8)
    for key, value in module.cloud_submodel.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_pipeline_gives_each_stage_its_part(tmp_path: Path) -> None:
    from dcccl.backbones import BackboneSpec
    from dcccl.commands.stage_runner import LightningStageRunner
    from dcccl.pipeline.boundary import check_stage
    from dcccl.pipeline.plan import dcccl_plan
    from dcccl.pipeline.steps import StageCall
    from tests.test_pipeline import settings

    split = SplitSpec(base=BackboneSpec("resnet10t"), ratio=0.25)
    run_settings = settings(tmp_path, split=split, stage_args={"cloud": ["--trainer.max_steps=1"]})
    plan = dcccl_plan(run_settings)
    calls = {call.stage: call for call in plan if isinstance(call, StageCall)}

    def part(call: StageCall, argument: str) -> str:
        value = call.model_args[argument]
        assert value["name"] == "split" and value["kwargs"]["base"]["name"] == "resnet10t"
        return value["kwargs"]["part"]  # type: ignore[no-any-return]

    assert part(calls["cloud"], "backbone") == "cloud"
    assert part(calls["distill"], "backbone") == "co"
    assert part(calls["cloud_round"], "co_backbone") == "co"
    assert "backbone" not in calls["device"].model_args and "co_backbone" not in calls["device"].model_args
    assert calls["cloud"].extra_args == ("--trainer.max_steps=1",)  # the user's stage_args come last and win
    # The parts are plan arguments: the stage parser resolves them to what the plan gave, so the boundary holds them.
    runner = LightningStageRunner(interactive=False)
    for stage in ("cloud", "distill", "cloud_round"):
        check_stage(calls[stage], runner.resolve(calls[stage]), run_settings.run.root)


def test_a_base_with_concatenations_is_refused_naming_the_first_layer_it_breaks() -> None:
    """DenseNet concatenates the outputs of its layers: cut alike, the channels of a concatenation do not line up."""
    base = build_backbone("densenet121", 10, 3)
    with pytest.raises(UnsupportedLayerError, match=r"cannot split DenseNet exactly: .*layer 'features\.denseblock1\."
                                                    r"denselayer2\.norm1' .*concatenation"):
        split_model(base, 0.25, torch.zeros(2, 3, 32, 32))


class _FlattenHead(ClassifierHeadMixin, nn.Module):
    """Conv features flattened into the classifier: 6 channels of 4x4 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.num_features = 6 * 4 * 4
        self.head: nn.Module = nn.Linear(self.num_features, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.conv(x), 1)


def test_a_flattened_head_whose_channel_share_is_not_integral_is_refused_up_front() -> None:
    # 6 channels at ratio 0.25: the cloud part keeps 4 channels (64 features) but 96 - round(0.25 * 96) = 72
    # classifier inputs, the co part 2 channels (32 features) but 24 inputs.
    with pytest.raises(UnsupportedLayerError, match=r"the cloud part fails at layer 'head' \(Linear\)"):
        split_model(_FlattenHead(), 0.25, torch.zeros(2, 1, 4, 4))


def test_a_stage_args_line_may_not_swap_a_stage_s_part_of_the_split(tmp_path: Path) -> None:
    import json

    from dcccl.backbones import BackboneSpec
    from dcccl.commands.stage_runner import LightningStageRunner
    from dcccl.pipeline.boundary import BoundaryViolation, check_stage
    from dcccl.pipeline.plan import dcccl_plan
    from dcccl.pipeline.steps import StageCall
    from tests.test_pipeline import settings

    # The whole base model in place of the control model's part: the part is a plan argument, so the boundary holds it.
    whole = json.dumps(BackboneSpec("resnet10t").to_dict())
    run_settings = settings(tmp_path, split=SplitSpec(base=BackboneSpec("resnet10t"), ratio=0.25),
                            stage_args={"distill": [f"--model.init_args.backbone={whole}"]})
    call = next(step for step in dcccl_plan(run_settings) if isinstance(step, StageCall) and step.stage == "distill")
    with pytest.raises(BoundaryViolation, match="must receive backbone="):
        check_stage(call, LightningStageRunner(interactive=False).resolve(call), run_settings.run.root)
