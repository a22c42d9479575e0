"""Stage 3c: fuse the co-submodel copies on the cloud; optionally fine-tune the fused head on cloud samples."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from dcccl.aggregation import DeviceWeighting, RunningAverage, fusion_weights
from dcccl.exports import NetworkExport, load_export, load_network
from dcccl.freeze import freeze
from lightning_modules.base import StageModule


def rebase_update(copy: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                  onto: dict[str, torch.Tensor], parameters: set[str]) -> dict[str, torch.Tensor]:
    """A stale device update applied to today's model: ``onto + (copy - base)`` for the ``parameters``.

    Buffers (batch-norm statistics, counters) keep the copy's own values: a difference of variances is no
    variance, and re-applying it could make one negative.
    """
    return {key: onto[key] + (value - base[key]) if key in parameters else value.clone()
            for key, value in copy.items()}


class FusionModule(StageModule):
    """Weighted average of the cloud's copy and the devices' copies of the co-submodel.

    The cloud's copy gets the share ``cloud_share`` (λ) and the devices share ``1 - λ`` by sample counts
    (or uniformly). Batch-norm running statistics are averaged; ``num_batches_tracked`` is not. With
    ``finetune_head`` the fused co-submodel's classifier (found through timm's ``get_classifier``) is then
    trained on cloud samples with CE(f(x) + h(x), y), the cloud submodel and the rest of h frozen;
    otherwise ``fit`` only fuses and exports. No device sample is used.

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        cloud_copy: Export of the cloud's trained copy.
        device_copies: Exports of the devices' trained copies (may be empty: no device reported this round).
        device_bases: For latest-update averaging: per device copy, the co-submodel it started from when it
            is older than this round (``None`` for a fresh copy). Such a stale copy contributes its update,
            re-applied to this round's start: ``rebase_onto + (copy - base)``.
        rebase_onto: This round's starting co-submodel (needed with ``device_bases``).
        cloud_share: λ, the cloud copy's share; ``None`` weights it by its sample count like a device.
        device_weighting: Split the devices' share by sample counts or uniformly.
        finetune_head: Fine-tune the fused co-submodel's classifier on cloud samples.
        cloud_submodel: Export of the cloud submodel (needed only with ``finetune_head``).
        optimizer: Optimizer for the head fine-tuning.
        export_path: Where to write the fused co-submodel.
    """

    data_partition = "cloud"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        cloud_copy: str,
        device_copies: list[str],
        device_bases: Optional[list[Optional[str]]] = None,
        rebase_onto: Optional[str] = None,
        cloud_share: Optional[float] = 0.5,
        device_weighting: DeviceWeighting = "samples",
        finetune_head: bool = False,
        cloud_submodel: Optional[str] = None,
        optimizer: Optional[OptimizerCallable] = None,
        export_path: Optional[str] = None,
    ) -> None:
        super().__init__(num_classes, in_chans, optimizer, export_path)
        cloud = self._checked(cloud_copy, num_classes)
        # Two passes over the device copies, one copy in memory at a time: memory does not grow with the fleet.
        device_counts = [self._checked(path, num_classes).sample_count or 0 for path in device_copies]
        self.weights = fusion_weights(cloud.sample_count or 0, device_counts, cloud_share, device_weighting)
        self.total_samples = (cloud.sample_count or 0) + sum(device_counts)
        bases = device_bases if device_bases is not None else [None] * len(device_copies)
        if len(bases) != len(device_copies):
            raise ValueError(f"{len(device_copies)} device copies but {len(bases)} device bases")
        if any(base is not None for base in bases) and rebase_onto is None:
            raise ValueError("device_bases need rebase_onto, the co-submodel this round started from")
        current = load_export(rebase_onto, "co_submodel").state_dict if rebase_onto is not None else None
        parameters = {name for name, _ in cloud.build().named_parameters()}
        running = RunningAverage()
        running.add(cloud.state_dict, self.weights[0])
        for path, base, weight in zip(device_copies, bases, self.weights[1:]):
            state = load_export(path, "co_submodel").state_dict
            if base is not None and current is not None:
                state = rebase_update(state, load_export(base, "co_submodel").state_dict, current, parameters)
            running.add(state, weight)
        device_shares = ", ".join(f"{w:.3f}" for w in self.weights[1:]) or "none reported"
        rank_zero_info(f"[dcccl] fusion weights: cloud {self.weights[0]:.3f}, devices {device_shares}")
        self.co_backbone = cloud.backbone
        self.co_submodel = cloud.build()
        self.co_submodel.load_state_dict(running.result())
        self.finetune_head = finetune_head
        # Only the head is trainable (also without fine-tuning: DDP refuses a module with nothing to train);
        # the body stays in eval mode so the fused batch-norm statistics are kept. Without fine-tuning a
        # network lacking timm's head API is fine.
        self.co_submodel.requires_grad_(False)
        self.co_submodel.eval()
        if finetune_head or hasattr(self.co_submodel, "get_classifier"):
            self.head().requires_grad_(True)
        self.cloud_submodel: Optional[nn.Module] = None
        if finetune_head:
            if cloud_submodel is None:
                raise ValueError("finetune_head needs the cloud submodel export (cloud_submodel)")
            self.cloud_submodel = freeze(load_network(cloud_submodel, "cloud_submodel", num_classes))

    @staticmethod
    def _checked(path: str, num_classes: int) -> NetworkExport:
        export = load_export(path, "co_submodel")
        if export.sample_count is None:
            raise ValueError(f"{path} records no sample count; it is not a trained co-submodel copy")
        if export.num_classes != num_classes:
            raise ValueError(f"{path} predicts {export.num_classes} classes but the data has {num_classes}: fuse only "
                             "copies of the co-submodel trained on this data")
        return export

    def head(self) -> nn.Module:
        """The fused co-submodel's classifier, through timm's head API."""
        get_classifier = getattr(self.co_submodel, "get_classifier", None)
        if get_classifier is None:
            raise TypeError(f"{type(self.co_submodel).__name__} has no get_classifier(); give it timm's head API")
        return get_classifier()

    def frozen_networks(self) -> list[nn.Module]:
        """The cloud submodel and the fused co-submodel's body (its batch-norm statistics stay fused)."""
        frozen = [self.co_submodel]
        return frozen + [self.cloud_submodel] if self.cloud_submodel is not None else frozen

    def on_fit_start(self) -> None:
        """Without head fine-tuning there is nothing to train: stop before the first batch."""
        if not self.finetune_head:
            self.trainer.should_stop = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Served logits ``f(x) + h(x)`` (needs the cloud submodel, i.e. ``finetune_head``)."""
        if self.cloud_submodel is None:
            raise RuntimeError("the served logits need the cloud submodel; fusion without finetune_head has none")
        with torch.no_grad():
            cloud_logits = self.cloud_submodel(x)
        return cloud_logits + self.co_submodel(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy of the served logits on cloud samples; only the head learns."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_fit_end(self) -> None:
        """Export the fused co-submodel with the number of samples behind all its copies."""
        self.write_export(self.co_submodel, "co_submodel", self.co_backbone, sample_count=self.total_samples)
