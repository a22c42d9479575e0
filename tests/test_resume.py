"""Nothing lost: a pipeline killed (SIGKILL) inside a stage and between rounds resumes where it stopped and ends
with exactly the metrics of a run that was never interrupted; the manifest guards what it skips."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.commands import command_env, dcccl, dcccl_command

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--rounds", "2", "--trainer.limit_train_batches", "8", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false"]


def _arguments(run_dir: Path, *extra: str) -> list[str]:
    return ["pipeline", "--config", "configs/quickstart.yaml", "--run_dir", str(run_dir), *SMALL, *extra]


def run_pipeline(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the pipeline to its end."""
    return dcccl(*_arguments(run_dir, *extra))


def kill_pipeline_when(run_dir: Path, moment: Callable[[], bool], arguments: list[str] | None = None) -> str:
    """Start the pipeline (default: the small quickstart), SIGKILL it as soon as ``moment()`` holds and return what it
    had printed."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as output:
        command = dcccl_command(*(arguments if arguments is not None else _arguments(run_dir)))
        process = subprocess.Popen(command, cwd=ROOT, env=command_env(), stdout=output, stderr=output)
        deadline = time.monotonic() + 300
        try:
            while not moment():
                assert process.poll() is None, f"the pipeline ended before the moment to kill it:\n{log.read_text()}"
                assert time.monotonic() < deadline, "the moment to kill the pipeline never came"
                time.sleep(0.01)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    return log.read_text()


def _inside_stage(stage_dir: Path, export: str) -> Callable[[], bool]:
    """Between a stage's first checkpoint and its export: the stage is half done."""
    return lambda: (stage_dir / "checkpoints" / "last.ckpt").is_file() and not (stage_dir / export).exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small pipeline run that nothing interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_pipeline(run_dir, "--trainer.deterministic", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deterministic: true" in (run_dir / "cloud" / "config.yaml").read_text()  # reaches every stage
    return run_dir


@pytest.mark.slow
def test_killed_pipeline_resumes_to_the_metrics_of_an_uninterrupted_run(uninterrupted: Path, tmp_path: Path) -> None:
    """Two runs of one config and seed (one of them killed three times) end with identical metrics."""
    expected = json.loads((uninterrupted / "metrics.json").read_text())
    run_dir = tmp_path / "run"
    # 1: in the middle of the cloud submodel's training (3 epochs, killed after the first checkpoint).
    kill_pipeline_when(run_dir, _inside_stage(run_dir / "cloud", "cloud_submodel.pt"))
    assert not (run_dir / "cloud" / "cloud_submodel.pt").exists()
    # 2: in round 1, once its device stage has started and before the device's copy is written.
    devices = run_dir / "rounds/round_001/devices"
    second = kill_pipeline_when(run_dir, lambda: (devices / "stage.json").is_file() and not (
        run_dir / "rounds/round_001/device_000/co_submodel.pt").exists())
    assert f"resuming from {run_dir / 'cloud/checkpoints/last.ckpt'}" in second
    # 3: between the rounds, right after round 1's evaluation.
    third = kill_pipeline_when(run_dir, (run_dir / "rounds/round_001/evaluate/metrics.json").is_file)
    assert "[dcccl] device 0 trained (1/1" in third
    assert "cloud submodel: done already, skipped" in third
    assert not (run_dir / "metrics.json").exists()

    resumed = run_pipeline(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "round 1/2: evaluation: done already, skipped" in resumed.stderr
    assert json.loads((run_dir / "metrics.json").read_text()) == expected

    manifest = json.loads((run_dir / "manifest.json").read_text())["artifacts"]
    assert {"cloud/cloud_submodel.pt", "rounds/round_002/fusion/co_submodel.pt", "metrics.json"} <= set(manifest)
    assert manifest["cloud/cloud_submodel.pt"]["stage"] == "cloud submodel"
    assert not list(run_dir.rglob("*.tmp"))  # no half-written file left behind


@pytest.mark.slow
def test_changed_config_and_corrupted_artifact_are_refused_by_name(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}

    changed = run_pipeline(run_dir, "--trainer.deterministic", "true",
                           "--stage_args", '{"distill": ["--model.init_args.temperature=2"]}')
    assert changed.returncode == 2
    assert "the config of the finished stage 'control model' changed" in changed.stderr
    assert "--rerun_changed" in changed.stderr and "Traceback" not in changed.stderr
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before

    cloud = run_dir / "cloud" / "cloud_submodel.pt"
    cloud.write_bytes(cloud.read_bytes()[:-100])  # truncated
    corrupted = run_pipeline(run_dir, "--trainer.deterministic", "true")
    assert corrupted.returncode == 2
    assert f"{cloud} is corrupted or truncated" in corrupted.stderr


@pytest.mark.slow
def test_a_round_killed_midway_resumes_with_the_devices_it_had_not_finished(tmp_path: Path) -> None:
    """Killed after some of a round's devices wrote their copies: the resumed round trains only the others and the
    run ends with the metrics of an uninterrupted one."""
    # The quickstart's device stage (40 steps a device): the fleet's five-step devices may all finish before the
    # kill comes.
    fleet = ["pipeline", "--config", "configs/fleet.yaml", "--rounds", "1", "--fleet.num_devices", "6",
             "--fleet.sample_fraction", "1.0", "--fleet.availability", "1.0", "--stages.device",
             "configs/stages/device.yaml", *SMALL[2:]]
    reference = dcccl(*fleet, "--rounds", "1", "--run_dir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "run"
    progress = run_dir / "rounds/round_001/devices/progress"
    kill_pipeline_when(run_dir, lambda: progress.is_dir() and len(list(progress.glob("*.json"))) >= 2,
                       [*fleet, "--rounds", "1", "--run_dir", str(run_dir)])
    finished = len(list(progress.glob("*.json")))
    assert 2 <= finished < 6
    resumed = dcccl(*fleet, "--rounds", "1", "--run_dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{finished} of 6 devices finished before the round was interrupted; training the other {6 - finished}" \
        in resumed.stderr
    assert resumed.stderr.count(" trained (") == 6 - finished  # one line per device trained
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(
        (tmp_path / "reference/metrics.json").read_text())


@pytest.mark.slow
def test_the_manifest_keeps_where_each_network_s_weights_came_from(uninterrupted: Path) -> None:
    """Lineage: the control model starts from scratch, each device copy from the co-submodel it was sent, each fusion
    from the copies it averaged; nothing that went down descends from a cloud-only export."""
    from dcccl.artifacts.manifest import Manifest

    manifest = Manifest(uninterrupted / "manifest.json")
    lineage = {key: entry.lineage for key, entry in manifest.entries.items() if entry.lineage is not None}
    sha = {key: entry.sha256 for key, entry in manifest.entries.items()}
    assert lineage["cloud/cloud_submodel.pt"] == {"from": [{"kind": "scratch"}], "cloud_only": []}
    control = next(key for key in lineage if key.endswith("control_model.pt"))
    assert lineage[control] == {"from": [{"kind": "scratch"}], "cloud_only": []}
    fused = sorted(key for key in lineage if "/fusion/" in key)
    assert fused and all(not value["cloud_only"] for value in lineage.values())
    for key in fused:
        averaged = {entry["sha256"] for entry in lineage[key]["from"]}
        round_dir = key.split("/fusion/")[0]
        copies = {sha[k] for k in sha if k.startswith(round_dir) and "/device_" in k and k.endswith(".pt")}
        assert copies and copies < averaged and len(averaged) == len(copies) + 1  # and the cloud round's copy
    device_copy = next(key for key in lineage if "/device_" in key)
    assert [entry["role"] for entry in lineage[device_copy]["from"]] == ["co_submodel"]
