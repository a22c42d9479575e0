"""A small convolutional network for low-resolution inputs that trains in seconds on a CPU."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dcccl.backbones.builders import register_backbone
from dcccl.backbones.classifier_head import ClassifierHeadMixin
from dcccl.errors import ConfigError

Norm = Literal["batch", "group"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # per sample: DP-SGD can train it (groups of two channels where the width allows)
        return nn.GroupNorm(max(1, channels // 2), channels)
    raise ConfigError(f"SmallCNN norm must be 'batch' or 'group', got {kind!r}")


def _conv_block(in_channels: int, out_channels: int, norm: Norm) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        _norm(norm, out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(ClassifierHeadMixin, nn.Module):
    """A VGG-like stack of conv-BN-ReLU-pool blocks, global average pooling and a linear head.

    Args:
        num_classes: Number of output logits.
        in_chans: Number of input channels.
        width: Channels of the first block; each further block doubles them.
        depth: Number of conv blocks (each halves the spatial size).
        norm: ``batch`` norm, or ``group`` norm (normalises each sample on its own: what DP-SGD needs).
    """

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 32, depth: int = 3,
                 norm: Norm = "batch") -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ConfigError(f"SmallCNN needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        channels = [in_chans] + [width * 2**i for i in range(depth)]
        self.features = nn.Sequential(*(_conv_block(c_in, c_out, norm) for c_in, c_out in zip(channels, channels[1:])))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels[-1]
        self.num_classes = num_classes
        self.head: nn.Module = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv features, globally average-pooled to ``(batch, num_features)``."""
        return torch.flatten(self.pool(self.features(x)), 1)


@register_backbone(key="small_cnn")
def small_cnn(num_classes: int, in_chans: int = 1, width: int = 32, depth: int = 3,
              norm: Norm = "batch") -> SmallCNN:
    """Build :class:`SmallCNN`; the default backbone of the quickstart for 28x28 digits."""
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, width=width, depth=depth, norm=norm)
