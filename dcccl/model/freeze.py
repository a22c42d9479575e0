"""Freezing a network that guides training but must not change: no gradients, eval mode."""

from __future__ import annotations

from torch import nn


def freeze(network: nn.Module) -> nn.Module:
    """Disable gradients and put ``network`` in eval mode (batch-norm statistics stay fixed); returns it."""
    network.requires_grad_(False)
    network.eval()
    return network
