"""Route 1, a new backbone by registering a builder: a tiny MLP with timm's head API.

Name it in a config as ``my_backbones:tiny_mlp`` (the key this module registers) or as
``my_backbones:build_tiny_mlp`` (the builder function itself); ``dcccl`` imports this module on first use.
This folder must be importable: run ``dcccl`` with ``PYTHONPATH=docs/examples`` (see docs/extending.md).
"""

from __future__ import annotations

import torch
from torch import nn

from dcccl.backbones import ClassifierHeadMixin, register_backbone


class TinyMLP(ClassifierHeadMixin, nn.Module):
    """Flatten, one hidden layer, a linear head.

    ``ClassifierHeadMixin`` supplies ``forward``, ``forward_head``, ``get_classifier`` and ``reset_classifier``
    from two things the network defines: ``forward_features`` (input -> features of size ``num_features``) and
    its final linear layer stored as ``self.head``.

    Args:
        num_classes: Number of output logits.
        in_chans: Number of input channels.
        image_size: Side of the (square) input images.
        hidden: Width of the hidden layer (= ``num_features``).
        dropout: Dropout before the head.
    """

    def __init__(self, num_classes: int, in_chans: int = 1, image_size: int = 28, hidden: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_chans * image_size * image_size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.num_features = hidden
        self.num_classes = num_classes
        self.head: nn.Module = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden features of shape ``(batch, num_features)``."""
        return self.body(x)


@register_backbone(key="tiny_mlp")
def build_tiny_mlp(num_classes: int, in_chans: int, image_size: int = 28, hidden: int = 64,
                   dropout: float = 0.0) -> TinyMLP:
    """Builder ``fn(num_classes, in_chans, **kwargs)``; a spec's ``kwargs`` arrive as the keyword arguments."""
    return TinyMLP(num_classes, in_chans, image_size=image_size, hidden=hidden, dropout=dropout)
