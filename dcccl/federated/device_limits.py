"""The device budget gate: what the device must run (control model + co-submodel) has to fit the phone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from dcccl.errors import DCCCLError
from dcccl.federated.costs import parameter_count, peak_training_memory_bytes, training_flops_per_sample


class DeviceBudgetExceeded(DCCCLError, ValueError):
    """The on-device part of the configuration does not fit the device budget."""


@dataclass
class DeviceBudget:
    """Hard limits of a device; unset limits are not checked.

    Args:
        max_params: Parameters of the control model and the co-submodel together.
        max_train_flops_per_sample: FLOPs of one device training step per sample.
        max_peak_train_memory_bytes: Peak memory of one device training step with ``batch_size`` samples.
        batch_size: The device's training batch size, for the memory figure.
    """

    max_params: Optional[int] = None
    max_train_flops_per_sample: Optional[float] = None
    max_peak_train_memory_bytes: Optional[int] = None
    batch_size: int = 32


def check_device_budget(budget: DeviceBudget, co_submodel: nn.Module, control_model: Optional[nn.Module],
                        sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """Measure the on-device part and raise :class:`DeviceBudgetExceeded` naming every figure over its limit.

    Returns the measured figures.
    """
    x = torch.zeros(budget.batch_size, *sample_shape)
    y = torch.arange(budget.batch_size) % num_classes
    measured: dict[str, Any] = {
        "params": parameter_count(co_submodel) + (parameter_count(control_model) if control_model is not None else 0),
        "train_flops_per_sample": training_flops_per_sample(co_submodel, x, y, control_model),
        "peak_train_memory_bytes": peak_training_memory_bytes(co_submodel, x, y, control_model),
    }
    limits = {"params": budget.max_params, "train_flops_per_sample": budget.max_train_flops_per_sample,
              "peak_train_memory_bytes": budget.max_peak_train_memory_bytes}
    over = [f"{name.replace('_', ' ')} {measured[name]:,.0f} > limit {limit:,.0f}"
            for name, limit in limits.items() if limit is not None and measured[name] > limit]
    if over:
        raise DeviceBudgetExceeded(
            "the on-device part (control model + co-submodel) exceeds the device budget: " + "; ".join(over)
            + f" (peak memory measured with a batch of {budget.batch_size})"
        )
    return measured
