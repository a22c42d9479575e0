"""timm's classifier-head API for custom networks, so every backbone is handled the same way."""

from __future__ import annotations

import torch
from torch import nn


class ClassifierHeadMixin:
    """Gives a network timm's head API from two attributes: ``num_features`` and ``head``.

    A subclass implements ``forward_features`` (input to pooled features of size ``num_features``)
    and stores its final linear layer as ``self.head``. The mixin supplies ``forward_head``,
    ``forward``, ``get_classifier`` and ``reset_classifier`` with timm's signatures.
    """

    num_features: int
    head: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map an input batch to pooled features of shape ``(batch, num_features)``."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Map pooled features to logits, or return them unchanged when ``pre_logits`` is set."""
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` classes (0: identity)."""
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes
