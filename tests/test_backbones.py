"""Tests of dcccl.backbones: registry, timm fallback, import paths, the head API, local weights and specs."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from dcccl.backbones import (
    BackboneNotFoundError,
    BackboneSpec,
    SmallCNN,
    build_backbone,
    builders,
    list_backbones,
    register_backbone,
)
from dcccl.backbones.builders import load_local_weights
from dcccl.registry import Registry

TIMM_MODEL = "resnet10t"  # small timm model, built with pretrained=False: nothing is downloaded


def my_builder(num_classes: int, in_chans: int, hidden: int = 4) -> nn.Module:
    """A builder reached through a ``package.module:function`` path (this very test module)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, hidden, kernel_size=3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(hidden, num_classes),
    )


@pytest.fixture
def clean_registry() -> Iterator[Registry]:
    """Restore the backbone registry to its state before the test."""
    before = set(builders.BACKBONES)
    yield builders.BACKBONES
    for name in set(builders.BACKBONES) - before:
        builders.BACKBONES.remove(name)


def _same_outputs(first: nn.Module, second: nn.Module, x: torch.Tensor) -> bool:
    """Whether two networks give identical outputs on ``x`` in eval mode."""
    first.eval()
    second.eval()
    with torch.no_grad():
        return torch.equal(first(x), second(x))


# ---------------------------------------------------------------------------------------------------------------------
# building by name


def test_small_cnn_is_registered_and_builds() -> None:
    assert "small_cnn" in list_backbones()
    network = build_backbone("small_cnn", num_classes=10, in_chans=1)
    assert isinstance(network, SmallCNN)
    logits = network(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10)


def test_small_cnn_kwargs_are_passed_to_the_builder() -> None:
    network = build_backbone("small_cnn", num_classes=4, in_chans=3, width=8, depth=3)
    # channels 3 -> 8 -> 16 -> 32: num_features = 8 * 2**2 = 32; 28 -> 14 -> 7 -> 3 spatially
    assert network.num_features == 32
    assert len(network.features) == 3
    assert network(torch.randn(2, 3, 28, 28)).shape == (2, 4)


def test_small_cnn_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="width >= 1 and depth >= 1"):
        SmallCNN(num_classes=10, width=0)
    with pytest.raises(ValueError, match="width >= 1 and depth >= 1"):
        SmallCNN(num_classes=10, depth=0)


def test_timm_fallback_builds_without_download() -> None:
    assert TIMM_MODEL not in list_backbones()
    network = build_backbone(TIMM_MODEL, num_classes=10, in_chans=1)
    assert network.default_cfg["architecture"] == TIMM_MODEL
    assert network.conv1[0].in_channels == 1
    assert network(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(BackboneNotFoundError) as info:
        build_backbone("small_cnm", num_classes=10, in_chans=1)
    message = str(info.value)
    assert "unknown backbone 'small_cnm'" in message
    assert "Did you mean: small_cnn" in message
    assert not message.startswith('"')  # not quoted like a plain KeyError
    assert isinstance(info.value, KeyError)


def test_unknown_name_without_close_matches_has_no_hint() -> None:
    with pytest.raises(BackboneNotFoundError) as info:
        build_backbone("qqqqzzzzxxxx", num_classes=10, in_chans=1)
    assert "Did you mean" not in str(info.value)
    assert "small_cnn" in str(info.value)  # the registered names are listed


def test_module_function_path_builds_a_network() -> None:
    # pytest registers this module in sys.modules under __name__, so the path resolves to it
    network = build_backbone(f"{__name__}:my_builder", num_classes=3, in_chans=2, hidden=6)
    assert network[0].in_channels == 2 and network[0].out_channels == 6
    assert network(torch.randn(2, 2, 8, 8)).shape == (2, 3)


def test_module_function_path_from_a_fresh_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "user_nets_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes, in_chans, scale=1):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 4 * 4, num_classes * scale))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    network = build_backbone("user_nets_pkg.nets:tiny", num_classes=5, in_chans=1, scale=2)
    assert network(torch.randn(2, 1, 4, 4)).shape == (2, 10)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:builder", "cannot import backbone builder 'no_such_module_xyz:builder'"),
        ("math:no_such_function", "cannot import backbone builder 'math:no_such_function'"),
        ("math:pi", "backbone builder 'math:pi' is not callable"),
    ],
)
def test_bad_module_function_paths(path: str, message: str) -> None:
    with pytest.raises(BackboneNotFoundError, match=message):
        build_backbone(path, num_classes=2, in_chans=1)


# ---------------------------------------------------------------------------------------------------------------------
# registration


def test_register_backbone_bare_uses_the_function_name(clean_registry: dict) -> None:
    def tiny_registered_net(num_classes: int, in_chans: int) -> nn.Module:
        return my_builder(num_classes, in_chans, hidden=2)

    returned = register_backbone(tiny_registered_net)
    assert returned is tiny_registered_net
    assert "tiny_registered_net" in list_backbones()
    assert clean_registry["tiny_registered_net"] is tiny_registered_net
    assert build_backbone("tiny_registered_net", 7, 1)(torch.randn(1, 1, 5, 5)).shape == (1, 7)


def test_register_backbone_with_key_as_decorator(clean_registry: dict) -> None:
    @register_backbone(key="keyed_net")
    def some_function_name(num_classes: int, in_chans: int) -> nn.Module:
        return my_builder(num_classes, in_chans, hidden=3)

    assert callable(some_function_name)  # the decorator returns the builder itself
    assert "keyed_net" in list_backbones()
    assert "some_function_name" not in list_backbones()
    assert build_backbone("keyed_net", 2, 1)[0].out_channels == 3


def test_register_backbone_duplicate_key_fails(clean_registry: dict) -> None:
    def first(num_classes: int, in_chans: int) -> nn.Module:
        return my_builder(num_classes, in_chans)

    def second(num_classes: int, in_chans: int) -> nn.Module:
        return my_builder(num_classes, in_chans)

    register_backbone(first, key="dup_net")
    register_backbone(first, key="dup_net")  # the same builder again is harmless
    with pytest.raises(ValueError, match="two backbones are registered as 'dup_net': one from tests.test_backbones"):
        register_backbone(second, key="dup_net")
    assert clean_registry["dup_net"] is first
    with pytest.raises(ValueError, match="registered as 'small_cnn': one from dcccl.backbones.small_cnn"):
        register_backbone(second, key="small_cnn")


def test_registered_name_shadows_timm(clean_registry: dict) -> None:
    register_backbone(my_builder, key=TIMM_MODEL)
    network = build_backbone(TIMM_MODEL, num_classes=3, in_chans=1)
    assert isinstance(network, nn.Sequential)


def test_registry_is_restored_after_registration_tests() -> None:
    assert "dup_net" not in list_backbones()
    assert "keyed_net" not in list_backbones()
    assert "tiny_registered_net" not in list_backbones()
    assert "small_cnn" in list_backbones()


# ---------------------------------------------------------------------------------------------------------------------
# head API of SmallCNN


def test_small_cnn_head_api() -> None:
    network = SmallCNN(num_classes=10, in_chans=1, width=32, depth=2)
    network.eval()
    x = torch.randn(2, 1, 28, 28)
    # width 32, depth 2: channels 32 -> 64, so 64 pooled features
    assert network.num_features == 64
    classifier = network.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert (classifier.in_features, classifier.out_features) == (64, 10)
    with torch.no_grad():
        features = network.forward_features(x)
        assert features.shape == (2, 64)
        assert torch.equal(network.forward_head(features, pre_logits=True), features)
        assert torch.equal(network.forward_head(features), classifier(features))
        assert torch.equal(network(x), classifier(features))


def test_small_cnn_reset_classifier() -> None:
    network = SmallCNN(num_classes=10)
    network.eval()
    x = torch.randn(2, 1, 28, 28)
    body_before = {k: v.clone() for k, v in network.features.state_dict().items()}
    network.reset_classifier(5)
    assert network.get_classifier().out_features == 5
    assert network(x).shape == (2, 5)
    for key, value in network.features.state_dict().items():
        assert torch.equal(value, body_before[key]), key  # only the head was replaced
    network.reset_classifier(0)
    assert isinstance(network.get_classifier(), nn.Identity)
    with torch.no_grad():
        assert torch.equal(network(x), network.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------------
# local weights


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_load_local_weights_gives_identical_outputs(tmp_path: Path, wrapper: str | None) -> None:
    torch.manual_seed(0)
    source = build_backbone("small_cnn", num_classes=10, in_chans=1, width=8)
    state = source.state_dict()
    file = tmp_path / "weights.pt"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, file)
    torch.manual_seed(1)  # a different initialisation, overwritten by the file
    loaded = build_backbone("small_cnn", num_classes=10, in_chans=1, checkpoint_path=file, width=8)
    x = torch.randn(3, 1, 28, 28)
    assert _same_outputs(source, loaded, x)


def test_load_local_weights_keeps_a_new_head_of_another_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone("small_cnn", num_classes=5, in_chans=1, width=8)
    file = tmp_path / "five_classes.pt"
    torch.save(source.state_dict(), file)
    torch.manual_seed(1)
    fresh = build_backbone("small_cnn", num_classes=10, in_chans=1, width=8)
    torch.manual_seed(1)  # same seed: the same initial head as `fresh`
    loaded = build_backbone("small_cnn", num_classes=10, in_chans=1, width=8, checkpoint_path=file)
    assert loaded.get_classifier().weight.shape == (10, loaded.num_features)
    assert torch.equal(loaded.head.weight, fresh.head.weight)
    assert torch.equal(loaded.head.bias, fresh.head.bias)
    for key, value in source.features.state_dict().items():
        assert torch.equal(loaded.features.state_dict()[key], value), key
    assert not torch.equal(loaded.features[0][0].weight, fresh.features[0][0].weight)
    x = torch.randn(2, 1, 28, 28)
    loaded.eval()
    source.eval()
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), source.forward_features(x))


def test_load_local_weights_errors(tmp_path: Path) -> None:
    network = SmallCNN(num_classes=10, width=8, depth=2)
    with pytest.raises(FileNotFoundError, match="pretrained weights file not found"):
        load_local_weights(network, tmp_path / "missing.pt")
    not_a_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_dict)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_local_weights(network, not_a_dict)
    shallower = tmp_path / "depth1.pt"  # lacks features.1.*
    torch.save(SmallCNN(num_classes=10, width=8, depth=1).state_dict(), shallower)
    with pytest.raises(ValueError, match=r"do not fit the network: missing \['features.1"):
        load_local_weights(network, shallower)
    deeper = tmp_path / "depth3.pt"  # has features.2.* in excess
    torch.save(SmallCNN(num_classes=10, width=8, depth=3).state_dict(), deeper)
    with pytest.raises(ValueError, match=r"unexpected \['features.2"):
        load_local_weights(network, deeper)


def test_timm_local_checkpoint_loads_the_body(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone(TIMM_MODEL, num_classes=10, in_chans=1)
    file = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), file)
    loaded = build_backbone(TIMM_MODEL, num_classes=10, in_chans=1, checkpoint_path=file)
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="pretrained weights file not found"):
        build_backbone(TIMM_MODEL, num_classes=10, in_chans=1, checkpoint_path=tmp_path / "missing.pth")


def test_timm_local_checkpoint_keeps_a_head_of_the_same_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone(TIMM_MODEL, num_classes=10, in_chans=1)
    file = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), file)
    loaded = build_backbone(TIMM_MODEL, num_classes=10, in_chans=1, checkpoint_path=file)
    assert torch.equal(loaded.fc.weight, source.fc.weight)


# ---------------------------------------------------------------------------------------------------------------------
# BackboneSpec


def test_backbone_spec_builds() -> None:
    spec = BackboneSpec(name="small_cnn", kwargs={"width": 8, "depth": 3})
    network = spec.build(num_classes=6, in_chans=3)
    assert isinstance(network, SmallCNN)
    assert network.num_features == 32  # 8 * 2**(3-1)
    assert network(torch.randn(2, 3, 16, 16)).shape == (2, 6)
    assert BackboneSpec().name == "small_cnn"


def test_backbone_spec_dict_round_trip(tmp_path: Path) -> None:
    spec = BackboneSpec(name="small_cnn", checkpoint_path=str(tmp_path / "w.pt"), kwargs={"width": 8})
    data = spec.to_dict()
    assert data == {"name": "small_cnn", "checkpoint_path": str(tmp_path / "w.pt"), "kwargs": {"width": 8},
                    "pretrained": False, "normalize": False}
    assert BackboneSpec.from_dict(data) == spec
    assert BackboneSpec.from_dict(BackboneSpec().to_dict()) == BackboneSpec()


def test_backbone_spec_with_checkpoint_loads_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = SmallCNN(num_classes=4, in_chans=1, width=4)
    file = tmp_path / "w.pt"
    torch.save({"state_dict": source.state_dict()}, file)
    torch.manual_seed(5)
    built = BackboneSpec(name="small_cnn", checkpoint_path=str(file), kwargs={"width": 4}).build(4, 1)
    assert _same_outputs(source, built, torch.randn(2, 1, 12, 12))


# ---------------------------------------------------------------------------------------------------------------------
# the contract every backbone meets


# Builders that need arguments get small ones; every other name is built with its defaults.
CONTRACT_KWARGS: dict[str, dict] = {
    "split": {"base": {"name": "small_cnn", "kwargs": {"width": 8}}, "ratio": 0.25, "part": "co"},
}
CONTRACT_CASES = [(name, CONTRACT_KWARGS.get(name, {})) for name in list_backbones()] + [
    (TIMM_MODEL, {}),
    ("mobilenetv3_small_050", {}),
    ("split", {"base": {"name": TIMM_MODEL}, "ratio": 0.25, "part": "cloud"}),
    ("split", {"base": {"name": "mobilenetv3_small_050"}, "ratio": 0.25, "part": "co", "input_size": 32}),
]


@pytest.mark.parametrize(("name", "kwargs"), CONTRACT_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_backbone_contract(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    network = build_backbone(name, num_classes=7, in_chans=1, **kwargs)
    network.train()
    x = torch.randn(2, 1, 32, 32)
    logits = network(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    trainable = [(key, p) for key, p in network.named_parameters() if p.requires_grad]
    assert trainable
    missing = [key for key, p in trainable if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    # the head API
    assert network.get_classifier().out_features == 7
    with torch.no_grad():
        pooled = network.forward_head(network.forward_features(x), pre_logits=True)
    # timm: pre-logits width is head_hidden_size where a head block follows the pooling (MobileNetV3).
    assert pooled.shape == (2, getattr(network, "head_hidden_size", network.num_features))
    network.reset_classifier(3)
    assert network.get_classifier().out_features == 3
    network.eval()
    with torch.no_grad():
        assert network(x).shape == (2, 3)
