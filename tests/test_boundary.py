"""The privacy boundary on the resolved stage configs: every way around it that a config or ``stage_args`` offers is
refused before anything runs, and what the pipeline hands each stage really reaches it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dcccl.commands.stage_runner import LightningStageRunner
from dcccl.errors import DCCCLError
from dcccl.pipeline.boundary import BoundaryViolation
from dcccl.pipeline.execution import PlanRun
from dcccl.pipeline.plan import dcccl_plan
from dcccl.pipeline.preflight import DataDescription
from tests.test_pipeline import CONFIGS, settings

DATA = DataDescription(10, 1, (1, 28, 28), np.zeros(4, dtype=np.int64), [np.arange(4)])


@pytest.fixture(scope="module")
def runner() -> LightningStageRunner:
    """One runner for the module: it builds the stage parser once."""
    return LightningStageRunner(interactive=False)


def check(tmp_path: Path, runner: LightningStageRunner, **changes: object) -> None:
    """Plan a one-round quickstart with ``changes`` and run every check before running."""
    run_settings = settings(tmp_path, rounds=1, data=CONFIGS / "data/mnist.yaml", **changes)
    PlanRun(run_settings, dcccl_plan(run_settings), runner).check(DATA)


def test_the_quickstart_passes(tmp_path: Path, runner: LightningStageRunner) -> None:
    check(tmp_path, runner)
    check(tmp_path, runner, stage_args={"device": ["--model.init_args.optimizer.init_args.lr=0.01"]})


def _cloud_submodel(tmp_path: Path) -> str:
    return str(tmp_path / "run/cloud/cloud_submodel.pt")


def test_a_whole_init_args_override_cannot_hand_the_device_the_cloud_submodel(tmp_path: Path,
                                                                             runner: LightningStageRunner) -> None:
    override = json.dumps({"control_model": _cloud_submodel(tmp_path), "co_submodel": "x.pt"})
    with pytest.raises(BoundaryViolation, match=r"must receive control_model=.*control_model.pt.*overrides it"):
        check(tmp_path, runner, stage_args={"device": [f"--model.init_args={override}"]})


def test_an_extra_config_file_cannot_hand_the_device_the_cloud_submodel(tmp_path: Path,
                                                                       runner: LightningStageRunner) -> None:
    extra = tmp_path / "sneaky.yaml"
    extra.write_text(f"model:\n  init_args:\n    control_model: {_cloud_submodel(tmp_path)}\n")
    with pytest.raises(BoundaryViolation, match="must receive control_model"):
        check(tmp_path, runner, stage_args={"device": ["--config", str(extra)]})


def test_the_device_may_read_no_other_file(tmp_path: Path, runner: LightningStageRunner) -> None:
    spec = json.dumps({"name": "small_cnn", "checkpoint_path": _cloud_submodel(tmp_path), "kwargs": {}})
    with pytest.raises(BoundaryViolation, match=r"only the control model and the co-submodel.*cloud_submodel.pt"):
        check(tmp_path, runner, stage_args={"device": [f"--model.init_args.co_backbone={spec}"]})


@pytest.mark.parametrize("argument", ["--data.init_args.device_classes=[0, 1, 2]",
                                      "--data.init_args.cloud_classes=[7, 8, 9]",
                                      "--data.init_args.seed=5"])
def test_a_device_stage_cannot_see_other_data(tmp_path: Path, runner: LightningStageRunner, argument: str) -> None:
    key = argument.split("=")[0].rsplit(".", 1)[-1]
    with pytest.raises(BoundaryViolation, match=rf"every stage must see the same data.*differs .* in data {key}"):
        check(tmp_path, runner, stage_args={"device": [argument]})


def test_a_pinned_partition_cannot_give_a_device_stage_cloud_samples(tmp_path: Path,
                                                                    runner: LightningStageRunner) -> None:
    with pytest.raises(BoundaryViolation, match="may train on device samples only.*cloud samples"):
        check(tmp_path, runner, stage_args={"device": ["--data.init_args.partition=cloud"]})


def test_a_cloud_stage_cannot_train_on_pooled_device_samples(tmp_path: Path, runner: LightningStageRunner) -> None:
    with pytest.raises(BoundaryViolation, match=r"must run lightning_modules.cloud.CloudSubmodelModule or a subclass.*"
                                                r"CentralizedModule"):
        check(tmp_path, runner, stage_args={"cloud": ["--model.class_path=lightning_modules.CentralizedModule"]})


def test_a_device_index_override_is_refused(tmp_path: Path, runner: LightningStageRunner) -> None:
    from dcccl.federated.fleet import FleetSpec

    with pytest.raises(BoundaryViolation, match="differs from stage .* in data device_index"):
        check(tmp_path, runner, fleet=FleetSpec(num_devices=2),
              stage_args={"device": ["--data.init_args.device_index=1"]})


def test_a_subclass_of_the_expected_module_is_fine(tmp_path: Path, runner: LightningStageRunner,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(CONFIGS.parent / "docs" / "examples"))
    check(tmp_path, runner, stages={**settings(tmp_path).stages,
                                    "cloud": CONFIGS.parent / "docs/examples/cloud_label_smoothing.yaml"})


@pytest.mark.slow
def test_a_cloud_stage_that_claims_pooled_samples_on_its_instance_gets_none(tmp_path: Path) -> None:
    """The boundary reads the module's class; the DataModule serves the instance that asks, pinned to its stage's
    partition: a subclass that changes ``data_partition`` in ``__init__`` is refused before it trains."""
    from tests.commands import dcccl

    result = dcccl("pipeline", "--config", "configs/quickstart.yaml", "--run_dir", str(tmp_path), "--rounds", "1",
                   "--stage_args", json.dumps({"cloud": ["--model.class_path=tests.pooled_cloud.PooledCloud"]}))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dcccl pipeline: error: the data is pinned to the cloud partition but the stage module "
                           "(PooledCloud) trains on pooled samples: a stage module must train on the samples its "
                           "stage is given; do not change its data_partition"), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cloud/cloud_submodel.pt").exists()


def test_the_stage_config_that_was_checked_is_the_one_that_runs(tmp_path: Path, runner: LightningStageRunner) -> None:
    """A stage config changed after the plan read it (before its stage runs) changes nothing: checks, stages and
    fingerprints read the copy taken when the plan was made; messages name the original file."""
    import shutil

    from dcccl.pipeline.config_snapshot import origin_of
    from dcccl.pipeline.steps import StageCall

    device_config = tmp_path / "device.yaml"
    shutil.copy(CONFIGS / "stages/device.yaml", device_config)
    run_settings = settings(tmp_path, rounds=1, data=CONFIGS / "data/mnist.yaml",
                            stages={**settings(tmp_path).stages, "device": device_config})
    plan = dcccl_plan(run_settings)
    device_config.write_text("model:\n  class_path: lightning_modules.CentralizedModule\n")
    PlanRun(run_settings, plan, runner).check(DATA)  # the boundary sees the device module the plan read
    call = next(step for step in plan if isinstance(step, StageCall) and step.stage == "device")
    assert runner.resolve(call).module_class.__name__ == "DeviceCoTrainingModule"
    assert origin_of(call.config_files[-1]) == device_config and call.config_files[-1] != device_config
    assert "CentralizedModule" not in call.describe()["config_files"][-1]
    # A plan made after the change reads the changed file, and is refused, naming the file as the user named it.
    changed_config = device_config.with_name("device2.yaml")
    changed_config.write_text(device_config.read_text())
    changed = settings(tmp_path, rounds=1, data=CONFIGS / "data/mnist.yaml",
                       stages={**settings(tmp_path).stages, "device": changed_config})
    with pytest.raises(DCCCLError, match=f"the device stage's config does not parse .*{changed_config}"):
        PlanRun(changed, dcccl_plan(changed), runner).check(DATA)


@pytest.mark.parametrize("where", ["a dict key", "a folder"])
def test_a_device_stage_names_no_file_in_a_dict_key_nor_a_folder(tmp_path: Path, runner: LightningStageRunner,
                                                                 where: str) -> None:
    cloud_folder = str(tmp_path / "run" / "cloud")
    other_folder = tmp_path / "elsewhere"
    other_folder.mkdir()
    argument = (f"--model.init_args.extras={json.dumps({cloud_folder + '/cloud_submodel.pt': 'x'})}"
                if where == "a dict key" else f"--model.init_args.folder={other_folder}")
    with pytest.raises(BoundaryViolation, match="the co-submodel, but its config also names"):
        check(tmp_path, runner, stage_args={"device": ["--model.class_path=tests.device_with_extras.DeviceWithExtras",
                                                       argument]})
