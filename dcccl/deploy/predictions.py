"""Predictions of the served model on image files: where a finished run keeps the served model, and the CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from dcccl.artifacts.atomic import atomic_write_text
from dcccl.artifacts.run_dir import RunDirectory


@dataclass
class Prediction:
    """The served model's answer for one image file.

    Args:
        path: The image's path relative to the folder predicted on.
        prediction: Index of the predicted class.
        class_name: Name of the predicted class.
        confidence: Softmax probability of the predicted class.
    """

    path: str
    prediction: int
    class_name: str
    confidence: float


PREDICTION_COLUMNS: tuple[str, ...] = tuple(field.name for field in fields(Prediction))


class UnfinishedRunError(FileNotFoundError):
    """A run directory that does not (yet) hold a served model."""


def served_model_exports(run_dir: str | Path) -> tuple[Path, Path]:
    """The cloud submodel and the last round's fused co-submodel of a finished pipeline run.

    A run is finished once the pipeline has written ``metrics.json``; its per-round history says which round
    was the last.

    Raises:
        UnfinishedRunError: ``run_dir`` is not a finished pipeline run, or an export of the served model is missing.
    """
    run = RunDirectory(run_dir)
    if not run.metrics.is_file():
        raise UnfinishedRunError(f"{run.root} is not a finished pipeline run ({run.metrics} not found): "
                                 "run dcccl pipeline to the end first")
    rounds = json.loads(run.metrics.read_text()).get("rounds")
    if not isinstance(rounds, list) or not rounds:
        raise UnfinishedRunError(f"{run.metrics} lists no finished rounds")
    exports = (run.cloud_submodel, run.fused_co_submodel(len(rounds)))
    missing = [str(path) for path in exports if not path.is_file()]
    if missing:
        raise UnfinishedRunError(f"{run.root} lacks the served model's exports: {', '.join(missing)}")
    return exports


def default_predictions_path(run_dir: str | Path) -> Path:
    """Where predictions on a run's served model are written unless told otherwise: ``<run_dir>/predictions.csv``."""
    return RunDirectory(run_dir).root / "predictions.csv"


def predictions_csv(predictions: Iterable[Prediction]) -> str:
    """The CSV text of ``predictions``: a header row (:data:`PREDICTION_COLUMNS`), then one row per image."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for row in predictions:
        writer.writerow([row.path, row.prediction, row.class_name, f"{row.confidence:.6f}"])
    return buffer.getvalue()


def write_predictions_csv(predictions: Iterable[Prediction], path: str | Path) -> Path:
    """Write ``predictions`` as CSV to ``path`` atomically (no half-written file under the final name)."""
    return atomic_write_text(path, predictions_csv(predictions))
