"""The served model: the cloud submodel and the co-submodel, logits summed."""

from __future__ import annotations

import torch
from torch import nn


class SummedLogits(nn.Module):
    """``F(x) = f(x) + h(x)``: two independent networks whose logits add up.

    Used for the served model (cloud submodel + co-submodel) and on devices for the guided
    co-submodel (control model + co-submodel).

    Args:
        base: The large or guiding network (``f`` or ``g``).
        co_submodel: The small network ``h``.
    """

    def __init__(self, base: nn.Module, co_submodel: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.co_submodel = co_submodel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Summed logits of shape ``(batch, num_classes)``."""
        return self.base(x) + self.co_submodel(x)
