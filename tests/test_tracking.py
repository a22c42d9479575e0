"""Experiment tracking: W&B runs per stage grouped by pipeline (offline, read back from the run files), CSV by
default and TensorBoard on request."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from dcccl.commands.stage_cli import cli_main
from dcccl.commands.stage_runner import stage_arguments
from dcccl.federated.fleet import FleetSpec
from dcccl.pipeline.plan import dcccl_plan
from dcccl.pipeline.steps import StageCall
from dcccl.reporting.tracking import prepare_wandb_environment, wandb_logger_args, with_save_dirs
from tests.commands import command_env, dcccl
from tests.test_pipeline import settings
from tests.wandb_records import read_offline_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("logger, expected", [
    ("WandbLogger", {}),
    ({"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "p"}}, {"project": "p"}),
    (["CSVLogger", {"class_path": "WandbLogger", "init_args": {"save_dir": "d"}}], {"save_dir": "d"}),
    (False, None), (None, None), ("CSVLogger", None),
])
def test_wandb_logger_is_found_in_every_way_of_writing_it(logger: object, expected: object) -> None:
    assert wandb_logger_args(logger) == expected


def test_loggers_named_without_a_directory_write_into_the_run(tmp_path: Path) -> None:
    stage_dir = tmp_path / "cloud"
    assert with_save_dirs("WandbLogger", tmp_path, stage_dir) == {
        "class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(tmp_path)}}
    chosen = ["TensorBoardLogger", {"class_path": "WandbLogger", "init_args": {"save_dir": "mine"}}, "MyLogger"]
    assert with_save_dirs(chosen, tmp_path, stage_dir) == [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(stage_dir)}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": "mine"}}, "MyLogger"]
    first = dcccl_plan(settings(tmp_path, trainer={"logger": "WandbLogger"}))[0]
    assert isinstance(first, StageCall) and first.trainer_args["logger"] == "WandbLogger"  # the plan names it only
    logger = json.loads(next(arg for arg in stage_arguments(first) if arg.startswith("--trainer.logger="))
                        .removeprefix("--trainer.logger="))
    assert logger["init_args"]["save_dir"] == str(tmp_path / "run")  # the runner gives it the run directory


def test_without_an_api_key_wandb_goes_offline_and_an_explicit_mode_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    assert prepare_wandb_environment() == "offline"
    assert os.environ["WANDB_PROJECT"] == "dcccl"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert prepare_wandb_environment() == "disabled"


def test_tracking_run_names_carry_the_round(tmp_path: Path) -> None:
    plan = dcccl_plan(settings(tmp_path, name="exp", rounds=2, fleet=FleetSpec(num_devices=3)))
    names = [(call.group, call.stage, call.run_name) for call in plan if isinstance(call, StageCall)]
    assert names[:3] == [("exp", "cloud", "exp/cloud"), ("exp", "distill", "exp/distill"),
                         ("exp", "cloud_round", "exp/round1/cloud_round")]
    devices = [name for _, stage, name in names if stage == "device"]
    assert devices == ["exp/round1/devices", "exp/round2/devices"]  # one device stage per round
    assert names[-1] == ("exp", "evaluate", "exp/round2/evaluate")


def _fit_cloud_stage(root: Path, *extra: str) -> None:
    cli_main(["fit", "--config", str(ROOT / "configs/stages/cloud.yaml"), f"--trainer.default_root_dir={root}",
              "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.enable_checkpointing=false", *extra])


def test_csv_is_the_default_logger_and_holds_the_resolved_config(tmp_path: Path) -> None:
    _fit_cloud_stage(tmp_path)
    version = tmp_path / "lightning_logs" / "version_0"
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    accuracies = [float(row["val/acc"]) for row in rows if row.get("val/acc")]
    assert len(accuracies) == 1 and 0.0 <= accuracies[0] <= 1.0
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["model"]["class_path"].endswith("CloudSubmodelModule")
    assert hparams["trainer"]["limit_train_batches"] == 3 and hparams["seed_everything"] is not None


def test_tensorboard_logger_on_request(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _fit_cloud_stage(tmp_path, "--trainer.logger=TensorBoardLogger", f"--trainer.logger.init_args.save_dir={tmp_path}")
    (events,) = (tmp_path / "lightning_logs" / "version_0").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert "val/acc" in accumulator.Tags()["scalars"]
    assert 0.0 <= accumulator.Scalars("val/acc")[-1].value <= 1.0


@pytest.mark.slow
def test_pipeline_with_wandb_offline_logs_one_run_per_stage_grouped_by_pipeline(tmp_path: Path) -> None:
    (tmp_path / "netrc").write_text("")  # no API key anywhere: W&B must go offline by itself, never prompt
    env = {key: value for key, value in command_env(NETRC=str(tmp_path / "netrc"), HOME=str(tmp_path)).items()
           if not key.startswith("WANDB_")}
    run_dir = tmp_path / "run"
    result = dcccl("pipeline", "--config", "configs/quickstart.yaml", "--name", "tracked", "--run_dir", str(run_dir),
                   "--rounds", "2", "--trainer.logger", "WandbLogger", "--trainer.max_epochs", "1",
                   "--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no W&B API key found, logging offline" in result.stderr
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in result.stderr

    runs = read_offline_runs(run_dir / "wandb")
    assert [(run.job_type, run.name) for run in runs] == [
        ("cloud", "tracked/cloud"), ("distill", "tracked/distill"),
        *[(stage, f"tracked/round{r}/{name}") for r in (1, 2) for stage, name in (
            ("cloud_round", "cloud_round"), ("device", "devices"), ("evaluate", "evaluate"))],
        ("pipeline", "tracked/summary"),
    ]
    assert {run.group for run in runs} == {"tracked"} and {run.project for run in runs} == {"dcccl"}
    stage_runs, summary = runs[:-1], runs[-1]
    for run in stage_runs:  # the resolved stage config is attached
        assert run.config["trainer"]["max_epochs"] == 1
        assert run.config["model"]["class_path"].startswith("lightning_modules.")
    assert any("val/acc" in row for row in stage_runs[0].history)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluations = [run for run in stage_runs if run.job_type == "evaluate"]
    for r, run in enumerate(evaluations, start=1):
        round_metrics = json.loads((run_dir / f"rounds/round_{r:03d}/evaluate/metrics.json").read_text())
        assert run.summary["served/acc"] == pytest.approx(round_metrics["served/acc"])
    per_round = [row for row in summary.history if "round" in row]
    assert [row["round"] for row in per_round] == [1, 2]
    assert [row["served/acc"] for row in per_round] == pytest.approx(metrics["served/acc_per_round"])
    assert per_round[-1]["transfers/downlink_bytes"] == metrics["transfers/downlink_bytes"]
    assert per_round[-1]["transfers/uplink_bytes"] == metrics["transfers/uplink_bytes"]
    assert summary.config["name"] == "tracked" and summary.config["rounds"] == 2
    assert {"plots/accuracy_per_round", "plots/confusion_matrix"} <= {
        key.rsplit("/", 1)[0] for key in summary.summary if key.endswith("/_type")}
    assert not (run_dir / "config.yaml").exists()  # each stage's config stays in its own directory
