"""Vertical splitting of a base model into a cloud submodel and a co-submodel.

Every channel dimension of ``C`` channels is cut into a large group (the first ``C - k`` channels, for the
cloud submodel) and a small group (the last ``k = round(ratio * C)``, for the co-submodel); connections between
the groups are dropped. Because the cut depends on ``C`` alone, both operands of a residual addition, a
depthwise convolution's channels and a squeeze-excitation gate are always cut alike. The layers that read the
raw input keep every input channel; the classifier is cut by its input features only, so the two submodels'
logits add up (the cloud submodel keeps the classifier's bias). When the base model's cross-group weights are
zero, ``base(x) == cloud(x) + co(x)`` exactly (in eval mode).

Supported layers: ``Conv2d`` (dense and depthwise), ``BatchNorm2d`` (and subclasses such as timm's
``BatchNormAct2d``), ``Linear``; any layer without parameters or buffers (activations, pooling, dropout).
That covers timm ResNets (basic and bottleneck blocks, downsampling shortcuts), plain sequential CNNs and the
MobileNet/EfficientNet family (depthwise convolutions, squeeze-excitation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from dcccl.errors import ConfigError

Part = Literal["cloud", "co"]
_HEAD_SIZE_ATTRIBUTES = ("num_features", "head_hidden_size")


class UnsupportedLayerError(ConfigError):
    """The base model holds a layer or a structure the vertical split cannot cut exactly."""


def co_channel_count(channels: int, ratio: float) -> int:
    """Channels of the small group: ``round(ratio * channels)``, at least 1 and leaving the cloud at least 1."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"the split ratio must lie in (0, 1), got {ratio}")
    if channels < 2:
        raise UnsupportedLayerError(f"cannot split a dimension of {channels} channel(s)")
    return min(max(1, round(ratio * channels)), channels - 1)


def channel_slice(channels: int, ratio: float, part: Part) -> slice:
    """The channels of ``part``: the cloud submodel takes the first ``C - k``, the co-submodel the last ``k``."""
    cut = channels - co_channel_count(channels, ratio)
    return slice(0, cut) if part == "cloud" else slice(cut, channels)


@dataclass
class _Layout:
    """What a trace of the base model tells: which layers read the raw input, which one is the classifier."""

    input_readers: set[str] = field(default_factory=set)
    classifier: Optional[str] = None


def _trace(base: nn.Module, example_input: torch.Tensor) -> _Layout:
    layout = _Layout()
    input_storage = example_input.untyped_storage().data_ptr()
    handles = []
    for name, module in base.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod: nn.Module, inputs: tuple[Any, ...], layer: str = name) -> None:
                first = inputs[0] if inputs else None
                if isinstance(first, torch.Tensor) and first.untyped_storage().data_ptr() == input_storage:
                    layout.input_readers.add(layer)
            handles.append(module.register_forward_pre_hook(hook))
    was_training = base.training
    try:
        base.eval()
        with torch.no_grad():
            base(example_input)
    finally:
        base.train(was_training)
        for handle in handles:
            handle.remove()
    if not layout.input_readers:
        raise UnsupportedLayerError("no Conv2d or Linear layer reads the model's input; cannot find where to start")
    get_classifier = getattr(base, "get_classifier", None)
    if get_classifier is None:
        raise UnsupportedLayerError(
            f"{type(base).__name__} has no get_classifier(): "
            "give it timm's head API (dcccl.backbones.ClassifierHeadMixin)"
        )
    classifier = get_classifier()
    layout.classifier = next((n for n, m in base.named_modules() if m is classifier), None)
    if not isinstance(classifier, nn.Linear) or layout.classifier is None:
        raise UnsupportedLayerError(f"the classifier of {type(base).__name__} is not a Linear layer: {classifier!r}")
    return layout


def _check_supported(base: nn.Module) -> None:
    for name, module in base.named_modules():
        owns_state = any(True for _ in module.parameters(recurse=False)) or \
            any(True for _ in module.buffers(recurse=False))
        if owns_state and not isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            raise UnsupportedLayerError(
                f"cannot split layer {name!r} ({type(module).__name__}): supported are Conv2d (dense and depthwise), "
                "BatchNorm2d and Linear"
            )


def _cut_conv(name: str, conv: nn.Conv2d, ratio: float, part: Part, reads_input: bool) -> None:
    out = channel_slice(conv.out_channels, ratio, part)
    weight = conv.weight.detach()
    if conv.groups == 1:
        inp = slice(None) if reads_input else channel_slice(conv.in_channels, ratio, part)
        new_weight = weight[out, inp]
    elif conv.groups == conv.in_channels == conv.out_channels:  # depthwise: channel i only sees channel i
        new_weight = weight[out]
        conv.groups = new_weight.shape[0]
    else:
        raise UnsupportedLayerError(
            f"cannot split layer {name!r}: grouped Conv2d with groups={conv.groups} "
            f"({conv.in_channels}->{conv.out_channels}); only dense and depthwise convolutions are supported"
        )
    conv.weight = nn.Parameter(new_weight.clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[out].clone())
    conv.out_channels, conv.in_channels = new_weight.shape[0], new_weight.shape[1] * conv.groups


def _cut_batch_norm(norm: nn.BatchNorm2d, ratio: float, part: Part) -> None:
    keep = channel_slice(norm.num_features, ratio, part)
    if norm.weight is not None:
        norm.weight = nn.Parameter(norm.weight.detach()[keep].clone())
    if norm.bias is not None:
        norm.bias = nn.Parameter(norm.bias.detach()[keep].clone())
    if norm.running_mean is not None:
        norm.running_mean = norm.running_mean[keep].clone()
        norm.running_var = norm.running_var[keep].clone()  # type: ignore[index]
    norm.num_features = keep.stop - keep.start


def _cut_linear(linear: nn.Linear, ratio: float, part: Part, is_classifier: bool, reads_input: bool) -> None:
    inp = slice(None) if reads_input else channel_slice(linear.in_features, ratio, part)
    out = slice(None) if is_classifier else channel_slice(linear.out_features, ratio, part)
    weight = linear.weight.detach()[out, inp]
    linear.weight = nn.Parameter(weight.clone())
    if linear.bias is not None:
        bias = linear.bias.detach()[out].clone()
        if is_classifier and part == "co":
            bias.zero_()  # the cloud submodel keeps the bias: the two logits add up to the base's
        linear.bias = nn.Parameter(bias)
    linear.out_features, linear.in_features = weight.shape


def _cut(base: nn.Module, layout: _Layout, ratio: float, part: Part) -> nn.Module:
    network = copy.deepcopy(base)
    for name, module in network.named_modules():
        reads_input = name in layout.input_readers
        if isinstance(module, nn.Conv2d):
            _cut_conv(name, module, ratio, part, reads_input)
        elif isinstance(module, nn.BatchNorm2d):
            _cut_batch_norm(module, ratio, part)
        elif isinstance(module, nn.Linear):
            _cut_linear(module, ratio, part, name == layout.classifier, reads_input)
    for attribute in _HEAD_SIZE_ATTRIBUTES:
        size = getattr(base, attribute, None)
        if isinstance(size, int) and size >= 2:
            cut = channel_slice(size, ratio, part)
            setattr(network, attribute, cut.stop - cut.start)
    return network


def _example(base: nn.Module, in_chans: Optional[int], input_size: int) -> torch.Tensor:
    if in_chans is None:
        first = next((m for m in base.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        in_chans = first.in_channels if isinstance(first, nn.Conv2d) else 1
    return torch.zeros(2, in_chans, input_size, input_size)


def split_model(base: nn.Module, ratio: float, example_input: Optional[torch.Tensor] = None,
                input_size: int = 32) -> tuple[nn.Module, nn.Module]:
    """Split ``base`` vertically into ``(cloud_submodel, co_submodel)``, both initialised from its weights.

    Args:
        base: The base model (left unchanged). It must have timm's head API (``get_classifier``).
        ratio: The co-submodel's share of every channel dimension, e.g. ``1/8``.
        example_input: A batch the model accepts, used once to find the layers that read the input
            (default: zeros of ``input_size`` x ``input_size`` with the first layer's input channels).
        input_size: Side of the default example input.

    Raises:
        UnsupportedLayerError: A layer cannot be split; the message names it.
    """
    _check_supported(base)
    example = example_input if example_input is not None else _example(base, None, input_size)
    layout = _trace(base, example)
    cloud, co = _cut(base, layout, ratio, "cloud"), _cut(base, layout, ratio, "co")
    check_exact_split(base, cloud, co, ratio, example)
    return cloud, co


@torch.no_grad()
def zero_cross_group_weights(base: nn.Module, ratio: float, example_input: Optional[torch.Tensor] = None,
                             input_size: int = 32) -> nn.Module:
    """Zero every weight connecting the cloud group to the co group (in place); returns ``base``.

    After this the base model is block-diagonal and ``base(x) == cloud(x) + co(x)`` for its split.
    """
    _check_supported(base)
    layout = _trace(base, example_input if example_input is not None else _example(base, None, input_size))
    _zero_cross_group(base, layout, ratio)
    return base


def _zero_cross_group(base: nn.Module, layout: _Layout, ratio: float) -> None:
    for name, module in base.named_modules():
        if name in layout.input_readers or name == layout.classifier:
            continue
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            rows, cols = module.out_channels, module.in_channels
        elif isinstance(module, nn.Linear):
            rows, cols = module.out_features, module.in_features
        else:
            continue
        for part, other in (("cloud", "co"), ("co", "cloud")):
            module.weight[channel_slice(rows, ratio, part), channel_slice(cols, ratio, other)] = 0.0  # type: ignore[arg-type]


# How far the parts' summed logits may be from the block-diagonal base's, relative to the logits' scale: float32
# rounding stays far below; a structure the split cannot follow (a concatenation, attention) is far above.
EXACTNESS_TOLERANCE = 1e-4
_CUT_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def _layer_outputs(network: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """Output of every cut layer on ``x`` (first call of each), and the layer running when the forward failed."""
    outputs: dict[str, torch.Tensor] = {}
    current: list[str] = []
    handles = []
    for name, module in network.named_modules():
        if isinstance(module, _CUT_LAYERS):
            handles.append(module.register_forward_pre_hook(lambda mod, args, layer=name: current.append(layer)))
            handles.append(module.register_forward_hook(
                lambda mod, args, out, layer=name: outputs.setdefault(layer, out.detach())))
    try:
        network.eval()
        with torch.no_grad():
            network(x)
    except RuntimeError:
        return outputs, current[-1] if current else "the first layer"
    finally:
        for handle in handles:
            handle.remove()
    return outputs, None


def check_exact_split(base: nn.Module, cloud: nn.Module, co: nn.Module, ratio: float, example: torch.Tensor) -> None:
    """Check that the two parts add up to the base model with its cross-group weights zeroed, on a random input.

    Layer by layer, the base's output must be the parts' outputs side by side (the classifier: their sum). The first
    layer where that fails names the place the split cannot follow.

    Raises:
        UnsupportedLayerError: The parts fail to run, or do not add up; the message names the first layer affected.
    """
    block_diagonal = zero_cross_group_weights(copy.deepcopy(base), ratio, example)
    x = torch.randn(example.shape, generator=torch.Generator().manual_seed(0), dtype=example.dtype)
    reference, _ = _layer_outputs(block_diagonal, x)
    parts = [_layer_outputs(part, x) for part in (cloud, co)]
    hint = ("a concatenation, attention or reshape that mixes channels before it; the split handles ResNets, plain "
            "sequential CNNs and the MobileNet/EfficientNet family")
    for (_, failed), part in zip(parts, ("cloud", "co")):
        if failed is not None:
            raise UnsupportedLayerError(
                f"cannot split {type(base).__name__} exactly: the {part} part fails at layer {failed!r} "
                f"({type(dict(base.named_modules())[failed]).__name__}), which receives channels the split cannot "
                f"follow ({hint})")
    classifier = getattr(base, "get_classifier", lambda: None)()
    modules = dict(base.named_modules())
    for name, expected in reference.items():
        cloud_out, co_out = parts[0][0].get(name), parts[1][0].get(name)
        if cloud_out is None or co_out is None:
            continue
        if modules[name] is classifier:
            combined = cloud_out + co_out
        elif cloud_out.shape[2:] == co_out.shape[2:] and cloud_out.shape[0] == co_out.shape[0]:
            combined = torch.cat([cloud_out, co_out], dim=1)
        else:
            combined = cloud_out  # shapes that cannot sit side by side: reported as a mismatch below
        scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
        if combined.shape != expected.shape or float((combined - expected).abs().max()) > EXACTNESS_TOLERANCE * scale:
            raise UnsupportedLayerError(
                f"cannot split {type(base).__name__} exactly: after the cut, layer {name!r} "
                f"({type(modules[name]).__name__}) no longer computes what the base model computes, because it "
                f"receives channels the split cannot follow ({hint})")
