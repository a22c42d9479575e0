"""The plan and the coordinator with a fake stage runner: order, inputs and outputs of each step, skipping and
re-running, what a re-run keeps."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import pytest

from dcccl.errors import ConfigError
from dcccl.pipeline.config_snapshot import origin_of
from dcccl.pipeline.coordinator import StageFailedError
from dcccl.pipeline.execution import PlanRun
from dcccl.pipeline.fusion import FusionStep
from dcccl.pipeline.plan import dcccl_plan
from dcccl.pipeline.settings import PipelineSettings, RestartPoint
from dcccl.pipeline.steps import StageCall
from tests.conftest import RecordingRunner

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_NAMES = ("cloud", "distill", "cloud_round", "device", "evaluate", "head", "centralized", "fedavg_client")
STAGES = {name: CONFIGS / f"stages/{name}.yaml" for name in STAGE_NAMES}


class FakeRunner(RecordingRunner):
    """Evaluations report a served accuracy that grows with the round."""

    def metrics(self, call: StageCall, output: Path) -> dict[str, Any]:
        return {"served/acc": 0.5 + 0.1 * call.round_index, "cloud_only/acc": 0.4}

    @property
    def labels(self) -> list[str]:
        return [call.label for call in self.calls]


def settings(tmp_path: Path, **kwargs: Any) -> PipelineSettings:
    return PipelineSettings(**{"stages": dict(STAGES), "run_dir": str(tmp_path / "run"), **kwargs})


def execute(s: PipelineSettings, runner: Any, restart_from: Optional[RestartPoint] = None,
            rerun_changed: bool = False) -> dict[str, Any]:
    return PlanRun(s, dcccl_plan(s), runner, restart_from, rerun_changed).execute(None)


def test_stage_order_and_artifact_handover(tmp_path: Path) -> None:
    runner = FakeRunner()
    plan = dcccl_plan(settings(tmp_path, rounds=2, seed_everything=7))
    assert [type(step).__name__ for step in plan].count("FusionStep") == 2  # fusion is a plain step, not a stage
    metrics = execute(settings(tmp_path, rounds=2, seed_everything=7), runner)
    assert [c.stage for c in runner.calls] == ["cloud", "distill"] + ["cloud_round", "device", "evaluate"] * 2
    cloud, distill, cr1, dev1, ev1, cr2, dev2, ev2 = runner.calls
    run = tmp_path / "run"
    assert distill.model_args["cloud_submodel"] == str(run / "cloud/cloud_submodel.pt")
    # Round 1: the cloud builds the co-submodel, writes it and trains its copy first; the device starts from the
    # cloud's copy (sequential rounds, the default).
    assert cr1.model_args["co_submodel"] is None
    assert cr1.model_args["initial_export_path"].endswith("initial_co_submodel.pt")
    assert dev1.model_args["co_submodel"] == cr1.model_args["export_path"]
    # Round 2 starts from round 1's fused co-submodel, which the fusion step wrote.
    fused_1 = run / "rounds/round_001/fusion/co_submodel.pt"
    assert cr2.model_args["co_submodel"] == str(fused_1) and fused_1.is_file()
    assert dev2.model_args["co_submodel"] == cr2.model_args["export_path"]
    assert ev2.model_args["co_submodel"] == str(run / "rounds/round_002/fusion/co_submodel.pt")
    fusion_2 = next(step for step in plan if isinstance(step, FusionStep) and step.round_index == 2)
    assert fusion_2.device_copies == (dev2.devices[0].export,) == dev2.outputs
    # The cloud side is guided by the cloud submodel by default.
    assert cr1.model_args["guide"] == distill.model_args["cloud_submodel"]
    assert all(c.seed == 7 and c.trainer_args["default_root_dir"] == str(c.work_dir) for c in runner.calls)
    assert [c.command for c in runner.calls].count("test") == 2
    assert metrics["served/acc_per_round"] == pytest.approx([0.6, 0.7])
    assert metrics["served/acc"] == pytest.approx(0.7)
    assert json.loads((run / "metrics.json").read_text()) == metrics


def test_each_stage_declares_what_it_reads_and_which_samples_it_trains_on(tmp_path: Path) -> None:
    plan = dcccl_plan(settings(tmp_path, rounds=2))
    calls = {(step.stage, step.round_index): step for step in plan if isinstance(step, StageCall)}
    run = tmp_path / "run"
    device = calls[("device", 2)]
    assert set(device.model_args) == {"control_model", "co_submodel", "export_path"}
    cloud_copy_2 = run / "rounds/round_002/cloud_round/co_submodel.pt"
    assert device.inputs == (run / "distill/control_model.pt", cloud_copy_2)
    assert device.partition == "device"
    # The control model goes down the first time the device takes part only; the co-submodel every round.
    assert calls[("device", 1)].devices[0].downlink == (run / "distill/control_model.pt",
                                                        run / "rounds/round_001/cloud_round/co_submodel.pt")
    assert device.devices[0].downlink == (cloud_copy_2,)
    # In parallel rounds (the paper's order) the device starts from the round's start, as the cloud does.
    parallel = {(step.stage, step.round_index): step for step in dcccl_plan(settings(tmp_path, rounds=2,
                                                                                      round_order="parallel"))
                if isinstance(step, StageCall)}
    assert parallel[("device", 1)].model_args["co_submodel"].endswith("rounds/initial_co_submodel.pt")
    assert parallel[("device", 2)].inputs[1] == run / "rounds/round_001/fusion/co_submodel.pt"
    assert {calls[(stage, 0)].partition for stage in ("cloud", "distill")} == {"cloud"}
    assert calls[("cloud_round", 1)].partition == "cloud" and calls[("evaluate", 1)].partition is None


def test_control_model_can_guide_the_cloud_side(tmp_path: Path) -> None:
    runner = FakeRunner()
    execute(settings(tmp_path, rounds=1, cloud_round_guide="control_model"), runner)
    assert runner.calls[2].model_args["guide"].endswith("distill/control_model.pt")


def test_second_run_skips_everything_without_running_a_stage(tmp_path: Path) -> None:
    execute(settings(tmp_path, rounds=2), FakeRunner())
    again = FakeRunner()
    rerun = PlanRun(settings(tmp_path, rounds=2), dcccl_plan(settings(tmp_path, rounds=2)), again)
    assert rerun.up_to_date
    assert rerun.execute(None)["served/acc"] == pytest.approx(0.7)
    assert again.calls == []


def test_missing_artifact_reruns_from_there_on_and_resumes_nothing_else(tmp_path: Path) -> None:
    execute(settings(tmp_path, rounds=2), FakeRunner())
    (tmp_path / "run/rounds/round_002/device_000/co_submodel.pt").unlink()
    again = FakeRunner()
    execute(settings(tmp_path, rounds=2), again)
    assert [c.stage for c in again.calls] == ["device", "evaluate"] and again.calls[0].round_index == 2
    assert again.resumed == [False, False]  # a finished stage leaves no checkpoint: it starts from scratch


class KilledRunner(FakeRunner):
    """Dies in the stage labelled ``victim`` after writing its last checkpoint, as a killed Trainer leaves it."""

    def __init__(self, victim: str) -> None:
        super().__init__()
        self.victim = victim

    def __call__(self, call: StageCall, resume: bool = False) -> None:
        if call.label == self.victim:
            call.last_checkpoint.parent.mkdir(parents=True, exist_ok=True)
            call.last_checkpoint.write_bytes(b"step 2 of 3")
            raise KeyboardInterrupt
        super().__call__(call, resume)


def test_a_stage_killed_midway_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uninterrupted = execute(settings(tmp_path / "whole", rounds=2), FakeRunner())
    victim = "round 2/2: device 0"
    killed = KilledRunner(victim)
    with pytest.raises(KeyboardInterrupt):
        execute(settings(tmp_path, rounds=2), killed)
    assert killed.labels[-1] == "round 2/2: cloud side"  # the last stage that finished before the kill
    checkpoint = tmp_path / "run/rounds/round_002/devices/checkpoints/last.ckpt"
    again = FakeRunner()
    with caplog.at_level(logging.INFO, logger="dcccl"):
        resumed = execute(settings(tmp_path, rounds=2), again)
    # Only the killed stage and what follows run; the killed one continues from its checkpoint, the next starts fresh.
    assert again.labels == [victim, "round 2/2: evaluation"] and again.resumed == [True, False]
    assert again.calls[0].last_checkpoint == checkpoint and checkpoint.read_bytes() == b"step 2 of 3"
    assert f"{victim}: running fit" in caplog.text and f"(resuming from {checkpoint})" in caplog.text
    assert resumed == uninterrupted and resumed["served/acc_per_round"] == pytest.approx([0.6, 0.7])
    # A checkpoint left by a start with another config is not resumed from: it is removed and the stage starts over.
    (checkpoint.parent.parent / "stage.json").write_text(json.dumps({"stage": victim, "config_sha256": "other"}))
    checkpoint.write_bytes(b"step 2 of 3")
    (tmp_path / "run/rounds/round_002/device_000/co_submodel.pt").unlink()
    other = FakeRunner()
    execute(settings(tmp_path, rounds=2), other)
    assert other.labels == [victim, "round 2/2: evaluation"] and other.resumed == [False, False]
    assert not checkpoint.exists()


def test_a_rebuilt_input_makes_its_readers_run_again(tmp_path: Path) -> None:
    """An artifact made again (here: by hand, recorded as if a stage wrote it) changes what reads it."""
    from dcccl.artifacts.manifest import Manifest
    from tests.conftest import write_fake_export

    execute(settings(tmp_path, rounds=1), FakeRunner())
    run = tmp_path / "run"
    control = run / "distill/control_model.pt"
    entry = Manifest(run / "manifest.json").entry(control)
    write_fake_export(control, sample_count=99)  # other bytes
    Manifest(run / "manifest.json").record((control,), entry.stage, entry.config_sha256, entry.inputs_sha256)
    again = FakeRunner()
    execute(settings(tmp_path, rounds=1), again)
    assert [c.stage for c in again.calls] == ["device", "evaluate"]


@pytest.mark.parametrize(("restart", "first"), [
    ("cloud", "cloud submodel"),
    ("distill", "control model"),
    ("rounds", "round 1/1: cloud side"),
])
def test_force_and_from_stage_rerun(tmp_path: Path, restart: RestartPoint, first: str) -> None:
    execute(settings(tmp_path, rounds=1), FakeRunner())
    again = FakeRunner()
    execute(settings(tmp_path, rounds=1), again, restart_from=restart)
    assert again.labels[0] == first and again.labels[-1] == "round 1/1: evaluation"
    assert not any(again.resumed)  # a forced stage starts from scratch


def test_stage_that_writes_nothing_fails_loudly(tmp_path: Path) -> None:
    class Silent(FakeRunner):
        def __call__(self, call: StageCall, resume: bool = False) -> None:
            pass

    with pytest.raises(StageFailedError, match="did not write"):
        execute(settings(tmp_path), Silent())


def test_trainer_options_and_stage_args_reach_the_stages(tmp_path: Path) -> None:
    runner = FakeRunner()
    execute(settings(tmp_path, rounds=1, trainer={"max_epochs": 1}, stage_args={"device": ["--model.init_args.x=1"]},
                     data=CONFIGS / "data/mnist.yaml"), runner)
    assert all(c.trainer_args["max_epochs"] == 1 for c in runner.calls)
    assert all(origin_of(c.config_files[0]) == CONFIGS / "data/mnist.yaml" for c in runner.calls)
    assert [c.extra_args for c in runner.calls if c.stage == "device"] == [("--model.init_args.x=1",)]
    assert all(c.extra_args == () for c in runner.calls if c.stage != "device")


def test_head_finetuning_is_a_stage_after_fusion_and_what_the_round_serves(tmp_path: Path) -> None:
    runner = FakeRunner()
    execute(settings(tmp_path, rounds=2, finetune_head=True), runner)
    run = tmp_path / "run"
    assert [c.stage for c in runner.calls][2:] == ["cloud_round", "device", "head", "evaluate"] * 2
    head_1 = next(c for c in runner.calls if c.stage == "head")
    assert head_1.model_args["co_submodel"] == str(run / "rounds/round_001/fusion/co_submodel.pt")
    assert head_1.partition == "cloud"
    second_round = [c for c in runner.calls if c.round_index == 2]
    assert next(c for c in second_round if c.stage == "cloud_round").model_args["co_submodel"] == str(
        run / "rounds/round_001/head/co_submodel.pt")


def test_invalid_pipeline_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rounds must be at least 1"):
        PipelineSettings(stages=dict(STAGES), rounds=0)  # type: ignore[arg-type]


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found: .*nowhere.yaml"):
        settings(tmp_path, data=tmp_path / "nowhere.yaml")


def test_bare_switches() -> None:
    from dcccl.commands.pipeline import pipeline_parser

    cfg = pipeline_parser().parse_args(["--config", str(CONFIGS / "quickstart.yaml"), "--force", "--rerun_changed"])
    assert cfg.force and cfg.rerun_changed
    assert not pipeline_parser().parse_args(["--config", str(CONFIGS / "quickstart.yaml")]).force
