"""Backbones as a user may write them: ``module:function`` builders returning a plain ``nn.Sequential``, without
timm's head API. Named in configs as ``tests.plain_backbones:sequential_cnn``."""

from __future__ import annotations

from torch import nn


def sequential_cnn(num_classes: int, in_chans: int, width: int = 8) -> nn.Sequential:
    """Two conv-BN-ReLU blocks, global pooling and a linear classifier, as one ``nn.Sequential``."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
