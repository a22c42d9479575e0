"""A serialisable description of a network: enough to rebuild it anywhere."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from torch import nn

from dcccl.backbones.builders import build_backbone
from dcccl.backbones.normalized import NormalizedInput, data_statistics


@dataclass
class BackboneSpec:
    """Which backbone to build, and how.

    Args:
        name: A registered backbone (e.g. ``small_cnn``), a ``package.module:function`` path or a timm model name.
        checkpoint_path: Optional local file with pretrained weights; never downloaded.
        kwargs: Extra keyword arguments for the builder (e.g. ``{width: 8}`` or timm's ``drop_rate``).
        pretrained: Without ``checkpoint_path``: timm's pretrained weights for ``name`` (a timm name, with its tag,
            e.g. ``mobilenetv3_large_100.ra_in1k``) from the local Hugging Face cache (``HF_HOME``); refused,
            saying where to put them, when they are not there.
        normalize: The network normalises its own input with the mean and std it was trained with (its timm data
            config); for data that gives images in [0, 1] (``normalize: false`` in the data), when networks that
            expect different statistics share the same samples.
    """

    name: str = "small_cnn"
    checkpoint_path: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    normalize: bool = False

    def build(self, num_classes: int, in_chans: int) -> nn.Module:
        """Instantiate the network for ``num_classes`` logits and ``in_chans`` input channels."""
        network = build_backbone(self.name, num_classes, in_chans, self.checkpoint_path, self.pretrained,
                                 **self.kwargs)
        if self.normalize:
            network = NormalizedInput(network, *data_statistics(network, in_chans))
        return network

    def without_weights(self) -> BackboneSpec:
        """The same architecture with every ``checkpoint_path`` and ``pretrained`` removed, nested base specs
        included (the normalisation stays: it belongs to the network).

        Used to rebuild a network whose weights come from elsewhere (an export), so that no weights file is
        read again or needs to exist any more.
        """
        return replace(self, checkpoint_path=None, kwargs=_strip_checkpoints(self.kwargs), pretrained=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for exports and configs."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def _strip_checkpoints(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: (False if key == "pretrained" else _strip_checkpoints(item)) for key, item in value.items()
                if key != "checkpoint_path"}
    if isinstance(value, list):
        return [_strip_checkpoints(item) for item in value]
    return value
