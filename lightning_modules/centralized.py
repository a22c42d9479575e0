"""Baseline: the whole served model trained on all samples pooled (an upper bound that violates privacy)."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.artifacts.exports import load_export
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.methods.centralized import CentralizedArguments
from dcccl.model.served import SummedLogits
from dcccl.pipeline.stages import register_stage
from lightning_modules.stage_module import SupervisedStageModule
from lightning_modules.training_budget import TrainingBudget


@register_stage("centralized", arguments=CentralizedArguments)
class CentralizedModule(SupervisedStageModule):
    """Trains cloud submodel + co-submodel jointly, CE(f(x) + h(x), y), on cloud and device samples pooled.

    This is the upper bound of the comparison: it needs every device sample on the cloud, which DC-CCL
    exists to avoid. It exports ``f`` and ``h`` like the pipeline does, so the same evaluation applies. In
    ``dcccl compare`` it takes DC-CCL's own architectures: ``f`` built afresh from the spec that DC-CCL's cloud
    submodel records (with the same pretrained weights, if any), ``h`` starting from DC-CCL's initial co-submodel.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        cloud_architecture: Export whose backbone spec builds a fresh cloud submodel (its trained weights are not
            used); overrides ``backbone``.
        co_submodel: Export of the co-submodel to start from; overrides ``co_backbone``.
        backbone: The cloud submodel's backbone without ``cloud_architecture`` (default: ``small_cnn``, width 32).
        co_backbone: The co-submodel's backbone without ``co_submodel`` (default: ``small_cnn``, width 8).
        optimizer: Optimizer for both submodels.
        export_path: Where to write the trained cloud submodel.
        co_export_path: Where to write the trained co-submodel.
        budget: How long the stage trains (floors, cap, early stopping on a validation metric); none: the
            trainer's own limits.
    """

    data_partition = "pooled"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        cloud_architecture: Optional[str] = None,
        co_submodel: Optional[str] = None,
        backbone: Optional[BackboneSpec] = None,
        co_backbone: Optional[BackboneSpec] = None,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
        co_export_path: Optional[str] = None,
        budget: Optional[TrainingBudget] = None,
    ) -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path, budget)
        self.backbone = backbone if backbone is not None else BackboneSpec("small_cnn", kwargs={"width": 32})
        if cloud_architecture is not None:
            self.backbone = load_export(cloud_architecture, "cloud_submodel").backbone
        self.co_backbone = co_backbone if co_backbone is not None else BackboneSpec("small_cnn", kwargs={"width": 8})
        start = None
        if co_submodel is not None:
            start = load_export(co_submodel, "co_submodel")
            if start.num_classes != num_classes:
                raise ConfigError(f"{co_submodel} predicts {start.num_classes} classes but the data has {num_classes}")
            self.co_backbone = start.backbone
        self.co_export_path = co_export_path
        self.model = SummedLogits(self.build_network(), start.build() if start is not None else self.build_co_network())

    def build_network(self) -> nn.Module:
        """Build the cloud submodel; a hook to override for a custom network."""
        return self.backbone.build(self.num_classes, self.in_chans)

    def build_co_network(self) -> nn.Module:
        """Build a fresh co-submodel (without ``co_submodel``); a hook to override for a custom network."""
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
