"""After fusion (optional): fine-tune the fused co-submodel's classifier on cloud samples, the cloud submodel frozen."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.artifacts.exports import load_export, load_network
from dcccl.errors import ConfigError
from dcccl.model.freeze import freeze
from dcccl.pipeline.plan import HeadArguments
from dcccl.pipeline.stages import register_stage
from lightning_modules.stage_module import SupervisedStageModule
from lightning_modules.training_budget import TrainingBudget


@register_stage("head", arguments=HeadArguments, required=lambda settings: settings.finetune_head)
class HeadFinetuneModule(SupervisedStageModule):
    """Trains only the fused co-submodel's classifier with CE(f(x) + h(x), y) on cloud samples.

    The classifier is found through timm's head API (``get_classifier``); the rest of ``h`` stays in eval mode, so
    the fused batch-norm statistics are kept, and the cloud submodel is frozen. No device sample is used. The
    export keeps the fused copy's sample count.

    With ``rows: cloud_classes`` only the classifier's rows of the classes the cloud holds train: the cloud raises
    its own classes where ``h`` drowns them, and leaves the rows of the classes only devices hold (which it has no
    samples of, and would only push down) as the devices made them.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        co_submodel: Export of the fused co-submodel.
        cloud_submodel: Export of the cloud submodel.
        optimizer: Optimizer for the classifier.
        export_path: Where to write the fine-tuned co-submodel.
        budget: How long the stage trains (floors, cap, early stopping on a validation metric); none: the
            trainer's own limits.
        rows: Which rows of the classifier train: ``all``, or only those of the classes the cloud holds.
    """

    data_partition = "cloud"

    def __init__(self, num_classes: int, in_chans: int, co_submodel: str, cloud_submodel: str,
                 optimizer: Optional[OptimizerCallable] = None, export_path: Optional[str] = None,
                 budget: Optional[TrainingBudget] = None, rows: Literal["all", "cloud_classes"] = "all") -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path, budget)
        fused = load_export(co_submodel, "co_submodel")
        if fused.num_classes != num_classes:
            raise ConfigError(f"{co_submodel} predicts {fused.num_classes} classes but the data has {num_classes}")
        self.co_backbone = fused.backbone
        self.co_submodel_start = co_submodel
        self.sample_count = fused.sample_count
        self.co_submodel = freeze(fused.build())
        get_classifier = getattr(self.co_submodel, "get_classifier", None)
        if not callable(get_classifier):
            raise ConfigError(f"head fine-tuning needs timm's head API, but {type(self.co_submodel).__name__} has no "
                              "get_classifier(): set finetune_head: false, or give the network timm's head API")
        head = get_classifier()
        head.requires_grad_(True)
        self.head_parameters = list(head.parameters())  # a plain list: not registered a second time
        self.rows = rows
        self.cloud_submodel = freeze(load_network(cloud_submodel, "cloud_submodel", num_classes))

    def setup(self, stage: str) -> None:
        """With ``rows: cloud_classes``: the gradients of the other classes' rows are zeroed (so they never move)."""
        if stage != "fit" or self.rows == "all":
            return
        trained = torch.tensor(self.train_class_counts()) > 0
        for parameter in self.head_parameters:
            if parameter.shape[0] == self.num_classes:
                mask = trained.reshape(-1, *([1] * (parameter.dim() - 1))).to(parameter.dtype)
                parameter.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device))

    def weights_from(self, network: nn.Module) -> list[str]:
        """The fused co-submodel whose head this stage fine-tunes."""
        return [self.co_submodel_start] if network is self.co_submodel else []

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
