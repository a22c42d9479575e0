"""After fusion (optional): fine-tune the fused co-submodel's classifier on cloud samples, the cloud submodel frozen."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.errors import ConfigError
from dcccl.method.freeze import freeze
from dcccl.run.exports import load_export, load_network
from lightning_modules.base import SupervisedStageModule


class HeadFinetuneModule(SupervisedStageModule):
    """Trains only the fused co-submodel's classifier with CE(f(x) + h(x), y) on cloud samples.

    The classifier is found through timm's head API (``get_classifier``); the rest of ``h`` stays in eval mode, so
    the fused batch-norm statistics are kept, and the cloud submodel is frozen. No device sample is used. The
    export keeps the fused copy's sample count.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        co_submodel: Export of the fused co-submodel.
        cloud_submodel: Export of the cloud submodel.
        optimizer: Optimizer for the classifier.
        export_path: Where to write the fine-tuned co-submodel.
    """

    data_partition = "cloud"

    def __init__(self, num_classes: int, in_chans: int, co_submodel: str, cloud_submodel: str,
                 optimizer: Optional[OptimizerCallable] = None, export_path: Optional[str] = None) -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path)
        fused = load_export(co_submodel, "co_submodel")
        if fused.num_classes != num_classes:
            raise ConfigError(f"{co_submodel} predicts {fused.num_classes} classes but the data has {num_classes}")
        self.co_backbone = fused.backbone
        self.sample_count = fused.sample_count
        self.co_submodel = freeze(fused.build())
        get_classifier = getattr(self.co_submodel, "get_classifier", None)
        if not callable(get_classifier):
            raise ConfigError(f"head fine-tuning needs timm's head API, but {type(self.co_submodel).__name__} has no "
                              "get_classifier(): set finetune_head: false, or give the network timm's head API")
        get_classifier().requires_grad_(True)
        self.cloud_submodel = freeze(load_network(cloud_submodel, "cloud_submodel", num_classes))

    def frozen_networks(self) -> list[nn.Module]:
        """The cloud submodel and the co-submodel's body (the head is a linear layer: eval mode changes nothing)."""
        return [self.co_submodel, self.cloud_submodel]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Served logits ``f(x) + h(x)``."""
        with torch.no_grad():
            cloud_logits = self.cloud_submodel(x)
        return cloud_logits + self.co_submodel(x)

    def on_fit_end(self) -> None:
        """Export the co-submodel with its fine-tuned classifier and the fused copy's sample count."""
        self.write_export(self.co_submodel, "co_submodel", self.co_backbone, sample_count=self.sample_count)
