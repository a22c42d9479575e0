"""Serving: the served model F = f + h predicts the class of image files; the answers are written as CSV."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from dcccl.artifacts.exports import Role, load_export
from dcccl.deploy.predictions import Prediction, default_predictions_path, served_model_exports, write_predictions_csv
from dcccl.errors import ConfigError
from dcccl.model.freeze import freeze
from dcccl.model.served import SummedLogits
from lightning_modules.stage_module import StageModule


class ServedModelPrediction(StageModule):
    """The served model of a pipeline run on the image files of the DataModule's ``predict_folder``.

    Run with ``dcccl predict``. Every image gets its predicted class (index and name) and the softmax
    probability of that class; when ``predict`` ends, global rank zero writes one CSV row per image to
    ``output`` (columns ``path``, ``prediction``, ``class_name``, ``confidence``; paths relative to the folder,
    sorted). Under DDP every rank predicts its share of the files and the rows are gathered on rank zero.
    Without a cloud submodel the served model is the co-submodel alone (as for the small-model baselines).

    Args:
        num_classes: Number of classes (linked from the DataModule).
        in_chans: Input channels (linked from the DataModule).
        run_dir: A finished pipeline run: its cloud submodel and its last round's fused co-submodel are served.
        cloud_submodel: Export of the cloud submodel, instead of ``run_dir``.
        co_submodel: Export of the (fused) co-submodel, instead of ``run_dir``.
        output: CSV file to write; defaults to ``predictions.csv`` in ``run_dir`` and is required without it.
    """

    def __init__(self, num_classes: int, in_chans: int, run_dir: Optional[str] = None,
                 cloud_submodel: Optional[str] = None, co_submodel: Optional[str] = None,
                 output: Optional[str] = None) -> None:
        super().__init__(num_classes, in_chans)
        if run_dir is not None:
            if cloud_submodel is not None or co_submodel is not None:
                raise ConfigError("give either run_dir or the exports (cloud_submodel, co_submodel), not both; "
                                 "with a config that sets run_dir, add --model.init_args.run_dir=null")
            cloud_path, co_path = served_model_exports(run_dir)
            cloud_submodel, co_submodel = str(cloud_path), str(co_path)
            output = output if output is not None else str(default_predictions_path(run_dir))
        elif co_submodel is None:
            raise ConfigError("nothing to serve: set run_dir (a finished pipeline run) or co_submodel "
                             "(and cloud_submodel)")
        if output is None:
            raise ConfigError("set output, the CSV file to write (without run_dir there is no default)")
        co_network = self._load(co_submodel, "co_submodel")
        served = co_network if cloud_submodel is None else SummedLogits(
            self._load(cloud_submodel, "cloud_submodel"), co_network)
        self.served = freeze(served)
        self.cloud_submodel = cloud_submodel
        self.co_submodel = co_submodel
        self.output = output
        self.class_names = [str(index) for index in range(num_classes)]
        self._predictions: list[Prediction] = []

    def _load(self, path: str, role: Role) -> nn.Module:
        export = load_export(path, role)
        if export.num_classes != self.num_classes:
            raise ConfigError(f"{path} predicts {export.num_classes} classes but the data has {self.num_classes}")
        if export.in_chans != self.in_chans:
            raise ConfigError(f"{path} takes {export.in_chans}-channel images but the data has {self.in_chans}")
        return export.build()

    def frozen_networks(self) -> list[nn.Module]:
        """Nothing trains here."""
        return [self.served]

    def setup(self, stage: str) -> None:
        """Take the class names from the DataModule (class indices as names without one)."""
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        if names is not None:
            if len(names) != self.num_classes:
                raise ConfigError(f"the data names {len(names)} classes but has {self.num_classes}")
            self.class_names = list(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Served logits."""
        return self.served(x)

    def on_predict_epoch_start(self) -> None:
        """Start with no rows (a module may predict more than once)."""
        self._predictions = []

    def predict_step(self, batch: tuple[torch.Tensor, list[str]], batch_idx: int) -> list[Prediction]:
        """Predicted class, its name and its softmax probability for each image of the batch."""
        images, paths = batch
        confidence, predicted = torch.softmax(self(images).float(), dim=1).max(dim=1)
        rows = [Prediction(path, index, self.class_names[index], probability)
                for path, index, probability in zip(paths, predicted.tolist(), confidence.tolist())]
        self._predictions.extend(rows)
        return rows

    def on_predict_end(self) -> None:
        """Gather every rank's rows and write the CSV on global rank zero; every rank waits for the file."""
        rows = self._gathered(self._predictions)
        if self.trainer.is_global_zero:
            path = write_predictions_csv(sorted(rows, key=lambda row: row.path), self.output)
            rank_zero_info(f"Predictions for {len(rows)} images: {path}")
        self.trainer.strategy.barrier("dcccl-predictions")

    def _gathered(self, rows: list[Prediction]) -> list[Prediction]:
        if self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return rows
        shares: list[Optional[list[Prediction]]] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(shares, rows)
        return [row for share in shares for row in share or []]
