"""Stage 3b: the cloud trains its own copy of the co-submodel on cloud samples, guided by f (or g)."""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.artifacts.exports import load_export
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.pipeline.plan import CloudRoundArguments
from dcccl.pipeline.stages import register_stage
from lightning_modules.guided import GuidedCoTrainingModule
from lightning_modules.training_budget import TrainingBudget


def _load_guide(path: Optional[str], num_classes: int) -> Optional[nn.Module]:
    if path is None:
        return None
    export = load_export(path)
    if export.role not in ("cloud_submodel", "control_model"):
        raise ConfigError(f"{path} holds a {export.role}; the guide must be a cloud submodel or a control model")
    if export.num_classes != num_classes:
        raise ConfigError(f"{path} predicts {export.num_classes} classes but the data has {num_classes}")
    return export.build()


@register_stage("cloud_round", arguments=CloudRoundArguments, required=True)
class CloudCoTrainingModule(GuidedCoTrainingModule):
    """Cloud side of a round: minimise CE(guide(x) + h(x), y) on cloud samples, the guide frozen.

    The guide is the cloud submodel by default (as in the paper's code; markedly better on the
    device classes) or the control model. In the first round no co-submodel exists yet: the cloud
    builds it from ``co_backbone`` and writes it to ``initial_export_path`` before training, so that
    every device starts from the same weights.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        guide: Export of the guide: a cloud submodel or a control model; ``None`` trains the co-submodel alone
            (the cloud as a plain FedAvg client).
        co_submodel: Export of the co-submodel to start from; ``None`` builds a fresh one.
        co_backbone: Backbone of a fresh co-submodel (default: ``small_cnn`` with width 8).
        initial_export_path: Where to write a freshly built co-submodel before training.
        optimizer: Optimizer for the co-submodel.
        export_path: Where to write the cloud's trained copy.
        budget: How long the stage trains (floors, cap, early stopping on a validation metric); none: the
            trainer's own limits.
        label_smoothing: Label smoothing of the cross-entropy: bounds the margins ``h`` learns to add.
        margin: Train with the multi-class hinge at this margin (in logits) instead of cross-entropy.
    """

    data_partition = "cloud"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        guide: Optional[str],
        co_submodel: Optional[str] = None,
        co_backbone: Optional[BackboneSpec] = None,
        initial_export_path: Optional[str] = None,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
        budget: Optional[TrainingBudget] = None,
        label_smoothing: float = 0.0,
        margin: Optional[float] = None,
    ) -> None:
        super().__init__(num_classes, in_chans, _load_guide(guide, num_classes), co_submodel, co_backbone, optimizer,
                         export_path, budget, label_smoothing, margin)
        self.initial_export_path = initial_export_path

    def setup(self, stage: str) -> None:
        """Write the co-submodel as the round starts from it, when asked to (before a checkpoint is restored,
        so a resumed stage writes the same starting point)."""
        if stage == "fit" and self.initial_export_path is not None:
            self.write_export(self.co_submodel, "co_submodel", self.co_backbone, path=self.initial_export_path)
