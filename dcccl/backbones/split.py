"""The ``split`` backbone: one part of a vertically split base model, and the spec that describes the split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dcccl.backbones.builders import register_backbone
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.model.vertical_split import Part, split_model


@dataclass
class SplitSpec:
    """A base model and how to split it: what the pipeline builds the submodels from.

    Args:
        base: The base model (any backbone; ``checkpoint_path`` may name local pretrained weights, a timm
            checkpoint or a Lightning checkpoint).
        ratio: The co-submodel's share of every channel dimension.
        input_size: Side of the example input used to trace the base model once.
    """

    base: BackboneSpec = field(default_factory=BackboneSpec)
    ratio: float = 0.125
    input_size: int = 32

    def part(self, part: Part) -> BackboneSpec:
        """The backbone spec of one submodel (rebuildable: the ``split`` backbone)."""
        kwargs = {"base": self.base.to_dict(), "ratio": self.ratio, "part": part, "input_size": self.input_size}
        return BackboneSpec(name="split", kwargs=kwargs)


@register_backbone(key="split")
def split_backbone(num_classes: int, in_chans: int, base: dict[str, Any], ratio: float = 0.125,
                   part: Literal["cloud", "co"] = "co", input_size: int = 32) -> nn.Module:
    """One submodel of a vertically split base model, initialised from the base's weights.

    Args:
        num_classes: Number of logits.
        in_chans: Input channels.
        base: The base model's :class:`BackboneSpec` as a dict (name, checkpoint_path, kwargs).
        ratio: The co-submodel's share of every channel dimension.
        part: ``cloud`` (the large group) or ``co`` (the small group).
        input_size: Side of the example input used to trace the base model.
    """
    if part not in ("cloud", "co"):
        raise ConfigError(f"split part must be 'cloud' or 'co', got {part!r}")
    network = BackboneSpec.from_dict(base).build(num_classes, in_chans)
    cloud, co = split_model(network, ratio, torch.zeros(2, in_chans, input_size, input_size))
    return cloud if part == "cloud" else co
