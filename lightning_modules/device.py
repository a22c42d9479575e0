"""Stage 3a: a device trains its copy of the co-submodel under the frozen control model."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.artifacts.exports import load_network
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.federated.attacks import Attack
from dcccl.federated.compression import Compression
from dcccl.federated.privacy import DifferentialPrivacy, check_trainable, require_opacus
from dcccl.pipeline.plan import DeviceArguments
from dcccl.pipeline.stages import register_stage
from lightning_modules.guided import GuidedCoTrainingModule
from lightning_modules.training_budget import TrainingBudget


@register_stage("device", arguments=DeviceArguments, required=True)
class DeviceCoTrainingModule(GuidedCoTrainingModule):
    """Device-side training: minimise CE(g(x) + h(x), y) on the device's own samples, g frozen.

    The stage receives only what the cloud sends down (the control model and the current co-submodel)
    and sees only device samples; it never receives the cloud submodel or any cloud sample. Its export
    is what goes up: the co-submodel copy and its sample count (and its samples per class, when the
    aggregation rule asks for them).

    With ``logit_adjustment`` τ > 0 the loss is the balanced softmax CE(g(x) + h(x) + τ log π, y), π the
    device's own label distribution (add-one smoothed): a device that holds few classes then does not teach ``h``
    to push down the classes it never sees as hard as plain cross-entropy would.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        control_model: Export of the distilled control model (must hold a control model); ``None`` trains the
            co-submodel without guidance (the "DC-CCL without control model" ablation).
        co_submodel: Export of the co-submodel to start from (the round's current one).
        co_backbone: Backbone of a fresh co-submodel when ``co_submodel`` is not given (standalone runs).
        optimizer: Optimizer for the co-submodel.
        export_path: Where to write the device's copy.
        budget: How long the stage trains (floors, cap, early stopping on a validation metric); none: the
            trainer's own limits.
        label_smoothing: Label smoothing of the cross-entropy: bounds the margins ``h`` learns to add.
        margin: Train with the multi-class hinge at this margin (in logits) instead of cross-entropy.
        logit_adjustment: τ of the balanced softmax (0: plain cross-entropy).
        report_class_counts: Record the copy's samples per class in its export (they go up with it).
        privacy: Train each device's copy with DP-SGD (Opacus, the ``privacy`` extra); the pipeline hands every
            device the run's ``privacy`` setting, and only device rounds apply it.
        compression: Send the co-submodel compressed each way (the pipeline hands every device the run's
            ``compression`` setting; device rounds apply it).
        attack: The run's ``attack`` setting: which devices of a simulated fleet lie, and how (device rounds apply
            it).
    """

    data_partition = "device"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        control_model: Optional[str],
        co_submodel: Optional[str] = None,
        co_backbone: Optional[BackboneSpec] = None,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
        budget: Optional[TrainingBudget] = None,
        label_smoothing: float = 0.0,
        margin: Optional[float] = None,
        logit_adjustment: float = 0.0,
        report_class_counts: bool = False,
        privacy: Optional[DifferentialPrivacy] = None,
        compression: Optional[Compression] = None,
        attack: Optional[Attack] = None,
    ) -> None:
        guide = load_network(control_model, "control_model", num_classes) if control_model is not None else None
        super().__init__(num_classes, in_chans, guide, co_submodel, co_backbone, optimizer, export_path, budget,
                         label_smoothing, margin)
        if logit_adjustment < 0:
            raise ConfigError(f"logit_adjustment must be non-negative, got {logit_adjustment}")
        self.logit_adjustment = logit_adjustment
        self.report_class_counts = report_class_counts
        self.log_prior: Optional[torch.Tensor] = None
        self.privacy = privacy
        self.compression = compression
        self.attack = attack
        if privacy is not None:
            require_opacus()
            check_trainable(self.co_submodel, "the device stage")

    def setup(self, stage: str) -> None:
        """Prepare for the device the DataModule serves (:meth:`begin_device`)."""
        if stage == "fit":
            if self.privacy is not None or self.compression is not None or self.attack is not None:
                raise ConfigError("privacy, compression and attack apply to device rounds (dcccl pipeline); a device "
                                  "stage run alone sends nothing: remove model.init_args.privacy/compression/attack")
            self.begin_device(self.train_class_counts())

    def begin_device(self, class_counts: list[int]) -> None:
        """With logit adjustment: the log of the device's own (add-one smoothed) label distribution."""
        if self.logit_adjustment > 0:
            counts = torch.tensor(class_counts, dtype=torch.float32) + 1.0
            self.log_prior = torch.log(counts / counts.sum())

    def training_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, of the logits shifted by τ log π with logit adjustment (the balanced softmax)."""
        if self.log_prior is not None:
            logits = logits + self.logit_adjustment * self.log_prior.to(logits.device)
        return super().training_loss(logits, y)

    @property
    def control_model(self) -> Optional[nn.Module]:
        """The frozen control model (the guide of this stage), if any."""
        return self.guide
