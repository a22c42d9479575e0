"""Stage 4: evaluate the served model F = f + h and the cloud submodel alone on the union test set."""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.exports import load_network
from dcccl.model.freeze import freeze
from dcccl.model.served import SummedLogits
from dcccl.pipeline.plan import EvaluateArguments
from dcccl.pipeline.stages import register_stage
from lightning_modules.stage_module import StageModule

MODELS = ("served", "cloud_only")
GROUPS = {"acc": "all", "acc_cloud_classes": "cloud", "acc_device_classes": "device_only"}


@register_stage("evaluate", arguments=EvaluateArguments, required=True)
class ServedModelEvaluation(StageModule):
    """Test accuracy of the served model and of the cloud submodel alone, overall and per class group.

    Groups: all test samples; samples of the classes the cloud holds; samples of the classes held only
    on devices. Run with ``dcccl test``; logs ``served/acc``, ``served/acc_cloud_classes``,
    ``served/acc_device_classes`` and the same under ``cloud_only/``, and writes them to ``metrics_path``
    together with the served model's confusion matrix (``served/confusion_matrix``, rows: true class).
    Without a cloud submodel the served model is the co-submodel alone (small-model baselines) and only
    ``served/*`` is reported.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        cloud_submodel: Export of the cloud submodel; ``None`` serves the co-submodel alone.
        co_submodel: Export of the (fused) co-submodel.
        metrics_path: JSON file to write the metrics to.
    """

    def __init__(self, num_classes: int, in_chans: int, cloud_submodel: Optional[str], co_submodel: str,
                 metrics_path: Optional[str] = None) -> None:
        super().__init__(num_classes, in_chans)
        co_network = load_network(co_submodel, "co_submodel", num_classes)
        self.served: Optional[SummedLogits] = None
        self.co_submodel = freeze(co_network)
        if cloud_submodel is not None:
            self.served = SummedLogits(load_network(cloud_submodel, "cloud_submodel", num_classes), co_network)
            freeze(self.served)
        self.models = MODELS if self.served is not None else ("served",)
        self.metrics_path = metrics_path
        self.accuracies = nn.ModuleDict({
            f"{model}__{group}": MulticlassAccuracy(num_classes, average="micro")
            for model in MODELS
            for group in GROUPS.values()
        })
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self._group_classes: dict[str, Optional[torch.Tensor]] = {}

    def accuracy(self, model: str, group: str) -> MulticlassAccuracy:
        """The accuracy metric of one model on one class group."""
        return cast(MulticlassAccuracy, self.accuracies[f"{model}__{group}"])

    def frozen_networks(self) -> list[nn.Module]:
        """Nothing trains here."""
        return [self.served if self.served is not None else self.co_submodel]

    def setup(self, stage: str) -> None:
        """Read which classes the cloud holds and which only the devices hold from the DataModule."""
        split = getattr(getattr(self.trainer, "datamodule", None), "class_split", None)
        if split is None:
            raise RuntimeError("evaluation needs a dcccl DataModule that knows the class split")
        # A group with no classes (e.g. every device class is also on the cloud) has no accuracy.
        self._group_classes = {"all": None, "cloud": torch.tensor(split.cloud_classes)}
        if split.device_only_classes:
            self._group_classes["device_only"] = torch.tensor(split.device_only_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Served logits."""
        return self.served(x) if self.served is not None else self.co_submodel(x)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Update every (model, class group) accuracy with this batch."""
        x, y = batch
        co_logits = self.co_submodel(x)
        logits = {"served": co_logits}
        if self.served is not None:
            cloud_logits = self.served.base(x)
            logits = {"served": cloud_logits + co_logits, "cloud_only": cloud_logits}
        for group, classes in self._group_classes.items():
            mask = torch.ones_like(y, dtype=torch.bool) if classes is None else torch.isin(y, classes.to(y.device))
            if not mask.any():
                continue
            for model in self.models:
                self.accuracy(model, group).update(logits[model][mask], y[mask])
        self.confusion.update(logits["served"], y)

    def on_test_epoch_end(self) -> None:
        """Log the accuracies and write them to ``metrics_path``."""
        results: dict[str, float] = {}
        for model in self.models:
            for key, group in GROUPS.items():
                if group in self._group_classes:
                    results[f"{model}/{key}"] = float(self.accuracy(model, group).compute())
        self.log_dict(results, sync_dist=True)
        confusion = self.confusion.compute().int().tolist()  # rows: true class, columns: predicted class
        if self.metrics_path is not None:
            if self.trainer.is_global_zero:
                atomic_write_json(self.metrics_path, {**results, "served/confusion_matrix": confusion})
            self.trainer.strategy.barrier("dcccl-metrics")
