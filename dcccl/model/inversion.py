"""Inputs synthesised from a frozen network by inverting it, for distilling the control model beyond the cloud's
own samples.

Model inversion in the manner of DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020): start from noise and
take gradient steps on the inputs so that the network assigns each its target class, while the statistics the
inputs raise at every batch-norm layer match the running statistics the network kept from its training data, and a
total-variation prior keeps neighbouring pixels close. The results are inputs the network answers confidently but
that are not its training samples: distilling on them as well teaches a student the network's answers away from the
samples it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dcccl.errors import ConfigError


@dataclass(frozen=True)
class InversionSettings:
    """How inputs are synthesised from a network.

    Args:
        steps: Adam steps on each chunk of inputs.
        lr: Adam's learning rate on the inputs (they live in the data's normalised space).
        batch_norm_weight: Weight of the batch-norm statistics prior (0: off; ignored for networks without
            ``BatchNorm2d`` layers).
        total_variation_weight: Weight of the total-variation prior on neighbouring pixels.
        l2_weight: Weight of the inputs' mean square (keeps them near the data's range).
        chunk_size: Inputs optimised together (the batch-norm prior compares the statistics of a chunk).
    """

    steps: int = 100
    lr: float = 0.1
    batch_norm_weight: float = 0.1
    total_variation_weight: float = 0.001
    l2_weight: float = 0.0001
    chunk_size: int = 128

    def __post_init__(self) -> None:
        if self.steps < 1 or self.chunk_size < 2:
            raise ConfigError(f"inversion needs steps >= 1 and chunk_size >= 2, got steps={self.steps}, "
                              f"chunk_size={self.chunk_size}")
        if self.lr <= 0 or min(self.batch_norm_weight, self.total_variation_weight, self.l2_weight) < 0:
            raise ConfigError("inversion needs a positive lr and non-negative prior weights")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between horizontally and vertically neighbouring pixels of ``(N, C, H, W)`` inputs."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class _BatchNormStatistics:
    """Hooks on every ``BatchNorm2d`` of a network: the distance between the per-channel mean and variance of what
    reaches each layer and the layer's running statistics, summed over the layers, for the last forward pass."""

    def __init__(self, network: nn.Module) -> None:
        self.distances: list[torch.Tensor] = []
        self.handles = [module.register_forward_hook(self._hook) for module in network.modules()
                        if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        variance = x.var(dim=(0, 2, 3), unbiased=False)
        self.distances.append(torch.linalg.vector_norm(mean - module.running_mean)  # type: ignore[operator]
                              + torch.linalg.vector_norm(variance - module.running_var))  # type: ignore[operator]

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """The summed distance of the last forward pass (zero for a network without batch norm), then forget it."""
        total = torch.stack(self.distances).sum() if self.distances else like.new_zeros(())
        self.distances = []
        return total

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def invert_network(network: nn.Module, targets: torch.Tensor, input_shape: Sequence[int],
                   settings: InversionSettings = InversionSettings(),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Synthesise one input per entry of ``targets`` (class indices) from the frozen ``network``.

    The network must be in eval mode (its batch-norm layers then use and keep their running statistics); its weights
    are left untouched. Inputs are optimised ``settings.chunk_size`` at a time, each chunk from its own standard
    normal noise drawn from ``generator``. Returns a ``(len(targets), *input_shape)`` tensor on the network's device.
    """
    if network.training:
        raise ValueError("invert_network needs the network in eval mode")
    device = next(network.parameters()).device
    statistics = _BatchNormStatistics(network)
    chunks = []
    try:
        for start in range(0, len(targets), settings.chunk_size):
            chunk_targets = targets[start:start + settings.chunk_size].to(device)
            noise = torch.randn((len(chunk_targets), *input_shape), generator=generator)
            x = noise.to(device).requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=settings.lr)
            for _ in range(settings.steps):
                optimizer.zero_grad(set_to_none=True)
                logits = network(x)
                loss = (F.cross_entropy(logits.float(), chunk_targets)
                        + settings.batch_norm_weight * statistics.take(logits)
                        + settings.total_variation_weight * total_variation(x)
                        + settings.l2_weight * x.pow(2).mean())
                loss.backward()
                optimizer.step()
            chunks.append(x.detach())
    finally:
        statistics.close()
    network.zero_grad(set_to_none=True)
    return torch.cat(chunks)
