"""Stage 2: distil the light-weight control model g from the frozen cloud submodel f on cloud samples."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric, MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.method.freeze import freeze
from dcccl.method.losses import DistillationLoss, distillation_loss
from dcccl.run.exports import load_network
from lightning_modules.base import StageModule


class ControlDistillationModule(StageModule):
    """Trains the control model to reproduce the frozen cloud submodel's logits on cloud samples.

    Validation reports the control model's fidelity to the cloud submodel: top-1 agreement and logit MSE.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        cloud_submodel: Export of the trained cloud submodel (the teacher).
        backbone: The control model's backbone (default: ``small_cnn`` with width 8).
        loss: ``mse`` on logits, or ``kl`` on temperature-softened outputs.
        temperature: Softening temperature of the ``kl`` loss.
        optimizer: Optimizer for the control model.
        export_path: Where to write the distilled control model.
    """

    data_partition = "cloud"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        cloud_submodel: str,
        backbone: Optional[BackboneSpec] = None,
        loss: DistillationLoss = "mse",
        temperature: float = 4.0,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
    ) -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path)
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        self.backbone = backbone if backbone is not None else BackboneSpec("small_cnn", kwargs={"width": 8})
        self.loss_kind = loss
        self.temperature = temperature
        self.cloud_submodel = freeze(load_network(cloud_submodel, "cloud_submodel", num_classes))
        self.control_model = self.build_network()
        self.val_agreement = MeanMetric()
        self.val_logit_mse = MeanSquaredError()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def build_network(self) -> nn.Module:
        """Build the control model; the hook to override for a custom network."""
        return self.backbone.build(self.num_classes, self.in_chans)

    def frozen_networks(self) -> list[nn.Module]:
        """The teacher stays frozen."""
        return [self.cloud_submodel]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Control model logits."""
        return self.control_model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Distillation loss against the teacher's logits on a batch of cloud samples."""
        x, _ = batch
        with torch.no_grad():
            teacher = self.cloud_submodel(x)
        loss = distillation_loss(self(x), teacher, self.loss_kind, self.temperature)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Fidelity to the teacher and accuracy on cloud-class test samples."""
        x, y = batch
        student, teacher = self(x), self.cloud_submodel(x)
        self.val_agreement.update((student.argmax(1) == teacher.argmax(1)).float())
        self.val_logit_mse.update(student, teacher)
        self.val_acc(student, y)
        self.log("val/agreement", self.val_agreement, prog_bar=True)
        self.log("val/logit_mse", self.val_logit_mse)
        self.log("val/acc", self.val_acc)

    def on_fit_end(self) -> None:
        """Export the control model."""
        self.write_export(self.control_model, "control_model", self.backbone, sample_count=self.train_sample_count())
