"""Stage 1: train the cloud submodel f on cloud samples with cross-entropy."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.backbones.spec import BackboneSpec
from dcccl.pipeline.plan import CloudArguments
from dcccl.pipeline.stages import register_stage
from lightning_modules.stage_module import SupervisedStageModule
from lightning_modules.training_budget import TrainingBudget


@register_stage("cloud", arguments=CloudArguments, required=True)
class CloudSubmodelModule(SupervisedStageModule):
    """Trains the cloud submodel on cloud samples only and exports it.

    Override :meth:`build_network` to bring a network that a :class:`BackboneSpec` cannot describe.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        backbone: The cloud submodel's backbone (default: ``small_cnn`` with width 32).
        optimizer: Optimizer for the cloud submodel.
        export_path: Where to write the trained cloud submodel.
        budget: How long the stage trains (floors, cap, early stopping on a validation metric); none: the
            trainer's own limits.
    """

    data_partition = "cloud"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        backbone: Optional[BackboneSpec] = None,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
        budget: Optional[TrainingBudget] = None,
    ) -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path, budget)
        self.backbone = backbone if backbone is not None else BackboneSpec("small_cnn", kwargs={"width": 32})
        self.cloud_submodel = self.build_network()

    def build_network(self) -> nn.Module:
        """Build the cloud submodel; the hook to override for a custom network."""
        return self.backbone.build(self.num_classes, self.in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cloud submodel logits."""
        return self.cloud_submodel(x)

    def on_fit_end(self) -> None:
        """Export the trained cloud submodel."""
        self.write_export(self.cloud_submodel, "cloud_submodel", self.backbone, sample_count=self.train_sample_count())
