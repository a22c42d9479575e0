"""The paper's configuration (configs/paper/): its YAML prints with the paper's backbones, and it runs end to end on
the CPU with a tiny input size, two generated images per class of its 1,196 classes, random weights, one step per
stage and the smallest backbones of the same families (EfficientNetV2-B0 for EfficientNetV2-L, MobileNetV3-Small
for MobileNetV3-Large: the full-size ones took five minutes of the test suite to write and read their weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dcccl.artifacts.exports import load_export
from dcccl.artifacts.run_dir import RunDirectory
from tests.commands import dcccl
from tests.image_folders import write_paper_folders

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper" / "paper.yaml"
# Random weights (nothing to download on a test machine), small backbones of the paper's families, one step per stage.
SMALL_BACKBONES = {stage: [f"--model.init_args.{key}.pretrained=false", f"--model.init_args.{key}.name={name}"]
                   for stage, key, name in (("cloud", "backbone", "tf_efficientnetv2_b0"),
                                            ("distill", "backbone", "mobilenetv3_small_050"),
                                            ("cloud_round", "co_backbone", "mobilenetv3_small_050"))}
ONE_STEP = ("--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false")


def tiny_data_config(tmp_path: Path) -> Path:
    """The paper's data config with generated folders and 32 px instead of 224."""
    folders = write_paper_folders(tmp_path / "images")
    config = yaml.safe_load((ROOT / "configs" / "paper" / "data.yaml").read_text())
    config["data"]["init_args"].update({f"{side}_dir": str(path) for side, path in folders.items()})
    config["data"]["init_args"].update(image_size=32, batch_size=16, val_fraction=0.5, num_workers=1)
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_paper_config_prints_with_its_backbones() -> None:
    result = dcccl("pipeline", "--config", str(PAPER), "--print_config", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["rounds"] == 10 and printed["finetune_head"] is True
    assert printed["aggregation"]["init_args"]["cloud_share"] == 0.5
    assert printed["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.slow
def test_the_paper_config_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = dcccl("pipeline", "--config", str(PAPER), "--data", str(tiny_data_config(tmp_path)), "--rounds", "1",
                   "--run_dir", str(run_dir), "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                   *ONE_STEP,
                   "--stage_args", json.dumps(SMALL_BACKBONES), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    run = RunDirectory(run_dir)
    metrics = json.loads(run.round_metrics(1).read_text())
    assert len(metrics["served/confusion_matrix"]) == 1196  # 1,000 cloud classes and 196 device classes
    assert Image.open(run_dir / "confusion_matrix.png").size[0] < 2000  # drawn at a readable size
    # The pipeline's precision reached every stage (32-true here: this CPU emulates bf16, at a minute per step).
    for stage in ("cloud", "distill", "rounds/round_001/head"):
        config = yaml.safe_load((run_dir / stage / "config.yaml").read_text())
        assert config["trainer"]["precision"] == "32-true", stage
    assert "not cached" in result.stderr and "augments its training images" in result.stderr
    cloud_submodel = load_export(run_dir / "cloud/cloud_submodel.pt")
    assert cloud_submodel.backbone.name == "tf_efficientnetv2_b0" and cloud_submodel.backbone.normalize
