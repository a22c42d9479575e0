"""The coordinator with a fake stage runner: order, inputs and outputs of each stage, skipping and re-running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dcccl.pipeline import Pipeline, StageCall, StageConfigs, StageFailedError
from tests.conftest import RecordingRunner

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = StageConfigs(*(CONFIGS / f"stages/{name}.yaml" for name in
                        ("cloud", "distill", "cloud_round", "device", "fusion", "evaluate")))


class FakeRunner(RecordingRunner):
    """Evaluations report a served accuracy that grows with the round."""

    def metrics(self, call: StageCall, output: Path) -> dict[str, Any]:
        round_index = int(output.parent.parent.name.split("_")[1])
        return {"served/acc": 0.5 + 0.1 * round_index, "cloud_only/acc": 0.4}

    @property
    def labels(self) -> list[str]:
        return [call.label for call in self.calls]


def make(tmp_path: Path, **kwargs: object) -> Pipeline:
    return Pipeline(STAGES, run_dir=str(tmp_path / "run"), **kwargs)  # type: ignore[arg-type]


def test_stage_order_and_artifact_handover(tmp_path: Path) -> None:
    runner = FakeRunner()
    metrics = make(tmp_path, rounds=2, seed_everything=7).execute(runner)
    assert [c.stage for c in runner.calls] == ["cloud", "distill"] + ["cloud_round", "device", "fusion", "evaluate"] * 2
    cloud, distill, cr1, dev1, fus1, ev1, cr2, dev2, fus2, ev2 = runner.calls
    run = tmp_path / "run"
    assert distill.model_args["cloud_submodel"] == str(run / "cloud/cloud_submodel.pt")
    # Round 1: the cloud builds the co-submodel and writes it; the device starts from that very file.
    assert cr1.model_args["co_submodel"] is None
    assert cr1.model_args["initial_export_path"] == dev1.model_args["co_submodel"]
    # Round 2 starts everywhere from round 1's fused co-submodel.
    assert cr2.model_args["co_submodel"] == dev2.model_args["co_submodel"] == fus1.model_args["export_path"]
    assert fus2.model_args["device_copies"] == [dev2.model_args["export_path"]]
    assert ev2.model_args["co_submodel"] == fus2.model_args["export_path"]
    # The cloud side is guided by the cloud submodel by default.
    assert cr1.model_args["guide"] == distill.model_args["cloud_submodel"]
    assert all(c.seed == 7 and c.trainer_args["default_root_dir"] == str(c.work_dir) for c in runner.calls)
    assert [c.command for c in runner.calls].count("test") == 2
    assert metrics["served/acc_per_round"] == pytest.approx([0.6, 0.7])
    assert metrics["served/acc"] == pytest.approx(0.7)
    assert json.loads((run / "metrics.json").read_text()) == metrics


def test_device_stage_receives_nothing_from_the_cloud_but_control_and_co_submodel(tmp_path: Path) -> None:
    runner = FakeRunner()
    make(tmp_path, rounds=1).execute(runner)
    device = next(c for c in runner.calls if c.stage == "device")
    assert set(device.model_args) == {"control_model", "co_submodel", "export_path"}
    assert device.model_args["control_model"].endswith("distill/control_model.pt")


def test_control_model_can_guide_the_cloud_side(tmp_path: Path) -> None:
    runner = FakeRunner()
    make(tmp_path, rounds=1, cloud_round_guide="control_model").execute(runner)
    assert runner.calls[2].model_args["guide"].endswith("distill/control_model.pt")


def test_second_run_skips_finished_stages(tmp_path: Path) -> None:
    make(tmp_path, rounds=2).execute(FakeRunner())
    again = FakeRunner()
    metrics = make(tmp_path, rounds=2).execute(again)
    assert again.calls == []
    assert metrics["served/acc"] == pytest.approx(0.7)


def test_missing_artifact_reruns_from_there_on(tmp_path: Path) -> None:
    make(tmp_path, rounds=2).execute(FakeRunner())
    (tmp_path / "run/rounds/round_002/device_000/co_submodel.pt").unlink()
    again = FakeRunner()
    make(tmp_path, rounds=2).execute(again)
    assert [c.stage for c in again.calls] == ["device", "fusion", "evaluate"] and again.calls[0].round_index == 2


@pytest.mark.parametrize(("options", "first"), [
    ({"force": True}, "cloud submodel"),
    ({"from_stage": "distill"}, "control model"),
    ({"from_stage": "rounds"}, "round 1/1: cloud side"),
])
def test_force_and_from_stage_rerun(tmp_path: Path, options: dict, first: str) -> None:
    make(tmp_path, rounds=1).execute(FakeRunner())
    again = FakeRunner()
    make(tmp_path, rounds=1, **options).execute(again)
    assert again.labels[0] == first and again.labels[-1] == "round 1/1: evaluation"


def test_stage_that_writes_nothing_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(StageFailedError, match="did not write"):
        make(tmp_path).execute(lambda call: None)


def test_trainer_options_and_stage_args_reach_the_stages(tmp_path: Path) -> None:
    runner = FakeRunner()
    make(tmp_path, rounds=1, trainer={"max_epochs": 1}, stage_args={"device": ["--model.init_args.x=1"]},
         data=CONFIGS / "data/mnist.yaml").execute(runner)
    assert all(c.trainer_args["max_epochs"] == 1 for c in runner.calls)
    assert all(c.config_files[0] == CONFIGS / "data/mnist.yaml" for c in runner.calls)
    assert [c.extra_args for c in runner.calls if c.stage == "device"] == [["--model.init_args.x=1"]]
    assert all(c.extra_args == [] for c in runner.calls if c.stage != "device")


@pytest.mark.parametrize("bad", [{"rounds": 0}, {"stage_args": {"clouds": []}}])
def test_invalid_pipeline_options(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        make(tmp_path, **bad)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found: .*nowhere.yaml"):
        make(tmp_path, data=tmp_path / "nowhere.yaml")


def test_bare_switches_read_as_true() -> None:
    from cli import with_bare_switches

    assert with_bare_switches(["--force", "--rounds", "2", "--rerun_changed"]) == [
        "--force", "true", "--rounds", "2", "--rerun_changed", "true"]
    assert with_bare_switches(["--force", "false", "--debug"]) == ["--force", "false", "--debug", "true"]
