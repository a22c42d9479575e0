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
