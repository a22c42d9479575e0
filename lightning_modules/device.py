"""Stage 3a: a device trains its copy of the co-submodel under the frozen control model."""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.backbones.spec import BackboneSpec
from dcccl.run.exports import load_network
from lightning_modules.guided import GuidedCoTrainingModule


class DeviceCoTrainingModule(GuidedCoTrainingModule):
    """Device-side training: minimise CE(g(x) + h(x), y) on the device's own samples, g frozen.

    The stage receives only what the cloud sends down (the control model and the current co-submodel)
    and sees only device samples; it never receives the cloud submodel or any cloud sample. Its export
    is what goes up: the co-submodel copy and its sample count.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        control_model: Export of the distilled control model (must hold a control model); ``None`` trains the
            co-submodel without guidance (the "DC-CCL without control model" ablation).
        co_submodel: Export of the co-submodel to start from (the round's current one).
        co_backbone: Backbone of a fresh co-submodel when ``co_submodel`` is not given (standalone runs).
        optimizer: Optimizer for the co-submodel.
        export_path: Where to write the device's copy.
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
    ) -> None:
        guide = load_network(control_model, "control_model", num_classes) if control_model is not None else None
        super().__init__(num_classes, in_chans, guide, co_submodel, co_backbone, optimizer, export_path)

    @property
    def control_model(self) -> Optional[nn.Module]:
        """The frozen control model (the guide of this stage), if any."""
        return self.guide
