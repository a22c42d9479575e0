"""Losses of the method: distilling the control model from the cloud submodel."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DistillationLoss = Literal["mse", "kl"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: DistillationLoss,
                      temperature: float = 1.0) -> torch.Tensor:
    """MSE between logits, or KL divergence between temperature-softened distributions (scaled by T^2)."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2


def margin_loss(logits: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Crammer-Singer multi-class hinge: ``max(0, margin - (z_y - max_{j != y} z_j))``, averaged over the batch.

    A sample the logits already classify with ``margin`` to spare contributes nothing: training stops pushing once
    its own side is right, instead of driving every other class's logits down without bound as cross-entropy does.
    """
    true = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, target.unsqueeze(1), float("-inf")).amax(dim=1)
    return F.relu(margin - (true - others)).mean()
