"""A network that normalises its own input: for data in [0, 1] shared by networks that expect different statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def data_statistics(network: nn.Module, in_chans: int) -> tuple[list[float], list[float]]:
    """The mean and std ``network`` was trained with (timm's data config: its pretrained config, else ImageNet's),
    averaged over the channels when it has another number of input channels than ``in_chans``."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=network)
    mean, std = [float(v) for v in config["mean"]], [float(v) for v in config["std"]]
    if len(mean) != in_chans:
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return mean, std


class NormalizedInput(nn.Module):
    """``network((x - mean) / std)``, with timm's head API passed through (``get_classifier``, ``forward_features``...).

    The statistics are buffers outside the state dict: a network rebuilt from its spec normalises the same way, and
    an exported file (ONNX, TorchScript) carries the normalisation in its graph.

    Args:
        network: The network.
        mean: Per-channel mean it expects its input to have been normalised with.
        std: Per-channel standard deviation, likewise.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(value <= 0 for value in std):
            raise ValueError(f"mean and std need one value per channel and a positive std, got {mean} and {std}")
        self.network = network
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the network's statistics."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output on the normalised input."""
        return self.network(self.normalize(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The network's features (timm's API) on the normalised input."""
        return self.network.forward_features(self.normalize(x))  # type: ignore[operator]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The network's head (timm's API)."""
        return self.network.forward_head(x, pre_logits=pre_logits)  # type: ignore[operator]

    def get_classifier(self) -> nn.Module:
        """The network's classifier (timm's API)."""
        return self.network.get_classifier()  # type: ignore[operator]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the network's classifier (timm's API)."""
        self.network.reset_classifier(num_classes)  # type: ignore[operator]

    def extra_repr(self) -> str:
        """The statistics, as the printed network shows them."""
        return f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}, " \
               f"std={[round(v, 4) for v in self.std.flatten().tolist()]}"
