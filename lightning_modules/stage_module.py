"""What every stage module shares: linked data shape, frozen guides, the optimizer, exports."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dcccl.artifacts.exports import NetworkExport, Role, save_export
from dcccl.artifacts.lineage import lineage_of
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import DCCCLError
from dcccl.federated.class_split import DataPartition
from lightning_modules.budget_callback import BudgetCallback
from lightning_modules.training_budget import TrainingBudget


class NonFiniteLossError(DCCCLError, ArithmeticError):
    """A stage's training loss became NaN or infinite; training of that stage stops."""


class StageModule(LightningModule):
    """Base of the stage modules.

    A stage declares which training samples it may see (``data_partition``); the DataModule serves exactly
    that partition. Networks returned by :meth:`frozen_networks` stay in eval mode with no gradients
    whatever the trainer does, so their weights and batch-norm statistics cannot change.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        optimizer: Optimizer for the trainable parameters.
        export_path: Where to write the stage's export at the end of ``fit`` (nothing is written if unset).
        budget: How long the stage trains (floors, cap, early stopping on a validation metric); none: the
            trainer's own limits.
    """

    data_partition: ClassVar[Optional[DataPartition]] = None

    def __init__(self, num_classes: int, in_chans: int, optimizer: Optional[OptimizerCallable] = None,
                 export_path: Optional[str] = None, budget: Optional[TrainingBudget] = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.optimizer_factory = optimizer if optimizer is not None else torch.optim.Adam
        self.export_path = export_path
        self.budget = budget

    def configure_callbacks(self) -> list[Callback]:
        """The training budget's callback, when the stage has a budget."""
        return [BudgetCallback(self.budget, type(self).__name__)] if self.budget is not None else []

    def frozen_networks(self) -> list[nn.Module]:
        """Networks that guide this stage and must not change."""
        return []

    def train(self, mode: bool = True) -> StageModule:
        """Switch training mode but keep frozen networks in eval mode."""
        super().train(mode)
        for network in self.frozen_networks():
            network.eval()
        return self

    def on_train_epoch_start(self) -> None:
        """Re-assert eval mode of the frozen networks (Lightning restores recorded modes after validation)."""
        for network in self.frozen_networks():
            network.eval()

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Stop the stage on a NaN or infinite loss, before it reaches the weights (one check per step)."""
        if not bool(torch.isfinite(loss.detach()).all()):
            where = f" (in {self.trainer.default_root_dir})" if self._trainer is not None else ""
            raise NonFiniteLossError(
                f"{type(self).__name__}{where}: the training loss is {loss.detach().float().sum().item()} at global "
                f"step {self.global_step} (epoch {self.current_epoch}); the stage was stopped and exported nothing: "
                "lower the learning rate, or check the data for NaN/inf values"
            )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The injected optimizer over :meth:`trainable_parameters`."""
        return self.optimizer_factory(self.trainable_parameters())

    def train_sample_count(self) -> int:
        """Training samples this stage saw, as counted by the DataModule."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_sample_count"):
            raise RuntimeError("this stage needs a dcccl DataModule to count its training samples")
        return int(datamodule.train_sample_count())

    def train_class_counts(self) -> list[int]:
        """Training samples of this stage per class, as counted by the DataModule."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_class_counts"):
            raise RuntimeError("this stage needs a dcccl DataModule to count its training samples per class")
        return [int(count) for count in datamodule.train_class_counts()]

    def weights_from(self, network: nn.Module) -> list[str]:
        """The exports ``network``'s weights were loaded from when the stage began (its lineage,
        :mod:`dcccl.artifacts.lineage`); empty: it was built from its backbone (its ``checkpoint_path``, or from
        scratch). A stage that starts a network from an export names the export here."""
        return []

    def write_export(self, network: nn.Module, role: Role, backbone: BackboneSpec, path: Optional[str] = None,
                     sample_count: Optional[int] = None, class_counts: Optional[list[int]] = None) -> None:
        """Write ``network`` as a self-describing export to ``path`` (default ``export_path``).

        Only global rank zero writes; every rank then waits, so no rank moves on before the file exists.
        """
        target = path if path is not None else self.export_path
        if target is None:
            return
        if self.trainer.is_global_zero:
            starts = self.weights_from(network) or ([backbone.checkpoint_path] if backbone.checkpoint_path else [])
            export = NetworkExport.of(network, role, backbone, self.num_classes, self.in_chans, sample_count,
                                      class_counts, self.data_partition, lineage_of(starts, backbone.pretrained))
            save_export(export, target)
        self.trainer.strategy.barrier("dcccl-export")


class SupervisedStageModule(StageModule):
    """A stage that minimises the cross-entropy of ``self(x)``: logs ``train/loss``, ``train/acc``, ``val/acc``.

    Subclasses define ``forward`` (the logits being trained: a submodel, or guide plus co-submodel).

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        optimizer: Optimizer for the trainable parameters.
        export_path: Where to write the stage's export at the end of ``fit``.
        budget: How long the stage trains (floors, cap, early stopping on a validation metric); none: the
            trainer's own limits.
    """

    def __init__(self, num_classes: int, in_chans: int, optimizer: Optional[OptimizerCallable] = None,
                 export_path: Optional[str] = None, budget: Optional[TrainingBudget] = None) -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path, budget)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy of the logits on a batch of this stage's samples."""
        x, y = batch
        logits = self(x)
        loss = self.training_loss(logits, y)
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def training_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss minimised: cross-entropy (the hook a stage overrides for another loss)."""
        return F.cross_entropy(logits, y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Loss and accuracy on the held-out validation samples of this stage's partition."""
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
