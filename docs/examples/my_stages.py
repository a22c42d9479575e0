"""Route 2, subclassing stage modules: a new loss, and the ``build_network()`` hook.

Point a stage config's ``class_path`` at a class here (``my_stages.LabelSmoothingCloudSubmodel``); this folder
must be importable: run ``dcccl`` with ``PYTHONPATH=docs/examples`` (see docs/extending.md).

The contract of ``build_network()``: a stage's export records the stage's spec (``self.backbone`` for the cloud
and distill stages, ``self.co_backbone`` for the co-submodel stages) and later stages rebuild the network from
that spec before loading the exported weights. So the hook must return a network that the spec rebuilds: build
through the spec (``super().build_network()``) and use the hook for what a spec cannot say, such as a custom
initialisation. A new architecture belongs in a builder (route 1, ``my_backbones.py``) that the spec names.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from dcccl.backbones import BackboneSpec
from lightning_modules import CloudCoTrainingModule, CloudSubmodelModule


class LabelSmoothingCloudSubmodel(CloudSubmodelModule):
    """The cloud submodel trained with label-smoothed cross-entropy (a new loss).

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        backbone: The cloud submodel's backbone (default: ``small_cnn`` with width 32).
        label_smoothing: Probability mass spread uniformly over all classes in the targets.
        optimizer: Optimizer for the cloud submodel.
        export_path: Where to write the trained cloud submodel.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        backbone: Optional[BackboneSpec] = None,
        label_smoothing: float = 0.1,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
    ) -> None:
        super().__init__(num_classes, in_chans, backbone, optimizer, export_path)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Label-smoothed cross-entropy; logs ``train/loss`` and ``train/acc`` like the stage it replaces."""
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss


class ZeroHeadCloudCoTraining(CloudCoTrainingModule):
    """The cloud side of a round whose fresh co-submodel starts with a zero classifier (the ``build_network`` hook).

    With ``h(x) = 0`` at the start, the served model ``f(x) + h(x)`` starts exactly as the cloud submodel.
    The hook builds through ``co_backbone``, so the spec this stage exports rebuilds the network; the zeroed
    weights travel in the export. ``build_network`` runs only in the first round (later rounds start from the
    fused co-submodel's export) and inside the base class's ``__init__``.
    """

    def build_network(self) -> nn.Module:
        """The network ``co_backbone`` describes, its classifier (timm's ``get_classifier``) set to zero."""
        network = super().build_network()
        for parameter in network.get_classifier().parameters():
            nn.init.zeros_(parameter)
        return network
