"""Training a co-submodel copy h under a frozen guide: minimise CE(guide(x) + h(x), y)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.artifacts.exports import load_export
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.model.freeze import freeze
from dcccl.model.losses import margin_loss
from lightning_modules.stage_module import SupervisedStageModule
from lightning_modules.training_budget import TrainingBudget


class GuidedCoTrainingModule(SupervisedStageModule):
    """Shared logic of the device stage and the cloud side of a round.

    The co-submodel starts from an export (the round's current co-submodel) or, when none is given, is
    built from ``co_backbone``. Only the co-submodel trains; the guide is frozen. Without a guide the
    co-submodel trains alone on CE(h(x), y) (the baselines: DC-CCL without control model, FedAvg).

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        guide: The frozen guide network (already loaded), or ``None`` for unguided training.
        co_submodel: Export of the co-submodel to start from; ``None`` builds a fresh one from ``co_backbone``.
        co_backbone: Backbone of a fresh co-submodel (ignored when ``co_submodel`` is given).
        optimizer: Optimizer for the co-submodel.
        export_path: Where to write the trained co-submodel copy.
        budget: How long the stage trains (floors, cap, early stopping on a validation metric); none: the
            trainer's own limits.
        label_smoothing: Label smoothing of the cross-entropy: bounds the margins ``h`` learns to add.
        margin: Train with the multi-class hinge at this margin (in logits) instead of cross-entropy.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        guide: Optional[nn.Module],
        co_submodel: Optional[str] = None,
        co_backbone: Optional[BackboneSpec] = None,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
        budget: Optional[TrainingBudget] = None,
        label_smoothing: float = 0.0,
        margin: Optional[float] = None,
    ) -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path, budget)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.margin = margin
        self.guide = freeze(guide) if guide is not None else None
        self.co_submodel_start = co_submodel
        if co_submodel is not None:
            start = load_export(co_submodel, "co_submodel")
            if start.num_classes != num_classes:
                raise ConfigError(f"{co_submodel} predicts {start.num_classes} classes but the data has {num_classes}")
            self.co_backbone = start.backbone
            self.co_submodel = start.build()
        else:
            default = BackboneSpec("small_cnn", kwargs={"width": 8})
            self.co_backbone = co_backbone if co_backbone is not None else default
            self.co_submodel = self.build_network()

    def weights_from(self, network: nn.Module) -> list[str]:
        """The co-submodel export this stage started from, if any."""
        return [self.co_submodel_start] if network is self.co_submodel and self.co_submodel_start else []

    def training_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the guided logits (label-smoothed when configured), or with ``margin`` the multi-class
        hinge that stops pushing once a sample is right by that margin."""
        if self.margin is not None:
            return margin_loss(logits, y, self.margin)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def begin_device(self, class_counts: list[int]) -> None:
        """Called before a device's copy is trained, with that device's samples per class (the hook for anything a
        loss derives from the local label distribution); nothing by default."""

    def build_network(self) -> nn.Module:
        """Build a fresh co-submodel; the hook to override for a custom network."""
        return self.co_backbone.build(self.num_classes, self.in_chans)

    def frozen_networks(self) -> list[nn.Module]:
        """The guide stays frozen."""
        return [self.guide] if self.guide is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Guided logits ``guide(x) + h(x)`` (``h(x)`` without a guide)."""
        if self.guide is None:
            return self.co_submodel(x)
        with torch.no_grad():
            guide_logits = self.guide(x)
        return guide_logits + self.co_submodel(x)

    # Whether the export records the copy's samples per class (the cloud's copy always; a device's only when asked).
    report_class_counts: bool = True

    def on_fit_end(self) -> None:
        """Export the trained copy with the number of samples behind it (its fusion weight)."""
        class_counts = self.train_class_counts() if self.report_class_counts else None
        self.write_export(self.co_submodel, "co_submodel", self.co_backbone, sample_count=self.train_sample_count(),
                          class_counts=class_counts)
