"""Stage 2: distil the light-weight control model g from the frozen cloud submodel f on cloud samples."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from timm.data import Mixup
from torch import nn
from torchmetrics import MeanMetric, MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from dcccl.artifacts.exports import load_network
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.model.freeze import freeze
from dcccl.model.inversion import InversionSettings, invert_network
from dcccl.model.losses import DistillationLoss, distillation_loss
from dcccl.pipeline.plan import DistillArguments
from dcccl.pipeline.stages import register_stage
from lightning_modules.stage_module import StageModule
from lightning_modules.training_budget import TrainingBudget

log = logging.getLogger("dcccl")  # shown on global rank zero only (dcccl.commands.console)


def _run_seed() -> int:
    """The run's seed as ``seed_everything`` left it in the environment (0 when unseeded)."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


@register_stage("distill", arguments=DistillArguments, required=True)
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
        mixup_alpha: Mixup's Beta(α, α) on the cloud samples the control model imitates ``f`` on (timm's ``Mixup``;
            0: off). Mixed images lie between the cloud's classes, nearer what a device may show ``g``.
        cutmix_alpha: CutMix's α, likewise (0: off).
        mix_prob: Share of the batches that are mixed.
        synthesised_inputs: How many inputs to synthesise from the frozen cloud submodel by inverting it
            (:func:`dcccl.model.inversion.invert_network`: from noise towards each of the cloud's classes in turn,
            matching its batch-norm statistics), once before the first epoch; every training batch then also shows the
            control model as many of them as it holds cloud samples, in a fixed cycle. Inputs ``f`` answers that are
            not cloud samples, nearer what a device may show ``g`` (0: off).
        inversion: How the inputs are synthesised (steps, learning rate, priors).
        cache_teacher_logits: Compute the frozen cloud submodel's logits on every training sample once, before the
            first epoch, and reuse them (mixed batches are always scored afresh). Not done when the data augments its
            training images (each epoch shows other crops); the stage says so.
        optimizer: Optimizer for the control model.
        export_path: Where to write the distilled control model.
        budget: How long the stage trains (floors, cap, early stopping on a validation metric); none: the
            trainer's own limits.
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
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 0.5,
        synthesised_inputs: int = 0,
        inversion: Optional[InversionSettings] = None,
        cache_teacher_logits: bool = True,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
        budget: Optional[TrainingBudget] = None,
    ) -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path, budget)
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        if synthesised_inputs < 0:
            raise ConfigError(f"synthesised_inputs must be 0 (off) or positive, got {synthesised_inputs}")
        self.backbone = backbone if backbone is not None else BackboneSpec("small_cnn", kwargs={"width": 8})
        self.loss_kind = loss
        self.temperature = temperature
        self.cloud_submodel = freeze(load_network(cloud_submodel, "cloud_submodel", num_classes))
        self.control_model = self.build_network()
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mix_prob,
                           num_classes=num_classes) if mixup_alpha > 0 or cutmix_alpha > 0 else None
        self.synthesised_inputs = synthesised_inputs
        self.inversion = inversion if inversion is not None else InversionSettings()
        self.synthesised: Optional[torch.Tensor] = None
        self.synthesised_logits: Optional[torch.Tensor] = None
        self.cache_teacher_logits = cache_teacher_logits
        self.teacher_logits: Optional[torch.Tensor] = None
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

    @property
    def wants_sample_indices(self) -> bool:
        """Training batches carry the samples' positions, to look up their cached teacher logits."""
        return self.cache_teacher_logits and not self._augmented_data()

    def _augmented_data(self) -> bool:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return bool(getattr(datamodule, "augments_training", False))

    def on_fit_start(self) -> None:
        """The synthesised inputs and the teacher's logits on them (with ``synthesised_inputs``); with
        ``cache_teacher_logits``: the teacher's logits on every training sample, in the dataset's order (in the
        trainer's precision, with the data's own loader settings)."""
        if self.synthesised_inputs:
            self._synthesise()
        if not self.cache_teacher_logits:
            return
        if self._augmented_data():
            log.info("[dcccl] distillation: the teacher's logits are computed on every batch (not cached): "
                           "the data augments its training images")
            return
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]
        samples = datamodule.train_dataset(datamodule.resolve_partition())
        logits = []
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            for x, _ in datamodule.sequential_loader(samples):
                x = self.trainer.precision_plugin.convert_input(x.to(self.device))
                logits.append(self.cloud_submodel(x).float())
        self.teacher_logits = torch.cat(logits)

    def _synthesise(self) -> None:
        """Invert the cloud submodel into ``synthesised_inputs`` inputs, their targets cycling over the classes the
        cloud's training samples hold, from noise seeded by the run's seed (a resumed stage makes the same ones)."""
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]
        counts = torch.tensor(datamodule.train_class_counts())
        classes = torch.nonzero(counts > 0).flatten()
        targets = classes[torch.arange(self.synthesised_inputs) % len(classes)]
        input_shape = tuple(datamodule.train_dataset(datamodule.resolve_partition())[0][0].shape)
        generator = torch.Generator().manual_seed(_run_seed() + 7919)
        started = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            self.synthesised = invert_network(self.cloud_submodel, targets, input_shape, self.inversion, generator)
        with torch.no_grad():
            self.synthesised_logits = self.cloud_submodel(self.synthesised).float()
        hit = (self.synthesised_logits.argmax(1).cpu() == targets).float().mean().item()
        log.info(f"[dcccl] distillation: synthesised {self.synthesised_inputs} inputs from the cloud submodel "
                       f"in {time.perf_counter() - started:.0f} s; it assigns {hit:.0%} of them their target class")

    def _synthesised_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``size`` synthesised inputs and the teacher's logits on them, cycling with the global step."""
        assert self.synthesised is not None and self.synthesised_logits is not None
        positions = (torch.arange(size) + self.global_step * size) % len(self.synthesised)
        positions = positions.to(self.synthesised.device)
        return self.synthesised[positions], self.synthesised_logits[positions]

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Distillation loss against the teacher's logits on a batch of cloud samples (and as many synthesised
        inputs, with ``synthesised_inputs``)."""
        x, y = batch[0], batch[1]
        mixed = self.mixup is not None and len(x) % 2 == 0  # timm mixes a batch with its own mirror image
        if mixed:
            x = self._mixed(x, y)
        if self.teacher_logits is not None and not mixed:
            teacher = self.teacher_logits[batch[2].to(self.teacher_logits.device)]
        else:
            with torch.no_grad():
                teacher = self.cloud_submodel(x)
        if self.synthesised is not None:
            extra_x, extra_teacher = self._synthesised_batch(len(x))
            x = torch.cat([x, extra_x.to(x.dtype)])
            teacher = torch.cat([teacher.float(), extra_teacher])
        student = self(x)
        loss = distillation_loss(student, teacher.to(student.dtype), self.loss_kind, self.temperature)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _mixed(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` mixed by timm's ``Mixup``, its random draws seeded by the run's seed and the step (numpy's global
        state is set aside), so that a resumed stage mixes as an uninterrupted one did."""
        saved = np.random.get_state()
        np.random.seed((_run_seed() * 1_000_003 + self.global_step) % 2**32)
        try:
            mixed, _ = self.mixup(x, y)  # type: ignore[misc]
        finally:
            np.random.set_state(saved)
        return mixed

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Fidelity to the teacher and accuracy on the cloud's held-out validation samples."""
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
