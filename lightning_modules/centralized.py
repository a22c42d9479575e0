"""Baseline: the whole served model trained on all samples pooled (an upper bound that violates privacy)."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.backbones.spec import BackboneSpec
from dcccl.summed import SummedLogits
from lightning_modules.base import SupervisedStageModule


class CentralizedModule(SupervisedStageModule):
    """Trains cloud submodel + co-submodel jointly, CE(f(x) + h(x), y), on cloud and device samples pooled.

    This is the upper bound of the comparison: it needs every device sample on the cloud, which DC-CCL
    exists to avoid. It exports ``f`` and ``h`` like the pipeline does, so the same evaluation applies.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        backbone: The cloud submodel's backbone (default: ``small_cnn`` with width 32).
        co_backbone: The co-submodel's backbone (default: ``small_cnn`` with width 8).
        optimizer: Optimizer for both submodels.
        export_path: Where to write the trained cloud submodel.
        co_export_path: Where to write the trained co-submodel.
    """

    data_partition = "pooled"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        backbone: Optional[BackboneSpec] = None,
        co_backbone: Optional[BackboneSpec] = None,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
        co_export_path: Optional[str] = None,
    ) -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path)
        self.backbone = backbone if backbone is not None else BackboneSpec("small_cnn", kwargs={"width": 32})
        self.co_backbone = co_backbone if co_backbone is not None else BackboneSpec("small_cnn", kwargs={"width": 8})
        self.co_export_path = co_export_path
        self.model = SummedLogits(self.build_network(), self.build_co_network())

    def build_network(self) -> nn.Module:
        """Build the cloud submodel; a hook to override for a custom network."""
        return self.backbone.build(self.num_classes, self.in_chans)

    def build_co_network(self) -> nn.Module:
        """Build the co-submodel; a hook to override for a custom network."""
        return self.co_backbone.build(self.num_classes, self.in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Summed logits ``f(x) + h(x)``."""
        return self.model(x)

    def on_fit_end(self) -> None:
        """Export both submodels."""
        count = self.train_sample_count()
        self.write_export(self.model.base, "cloud_submodel", self.backbone, sample_count=count)
        self.write_export(self.model.co_submodel, "co_submodel", self.co_backbone, path=self.co_export_path,
                          sample_count=count)
