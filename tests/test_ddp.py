"""The pipeline under DDP: 2 CPU processes (gloo) through the real ``dcccl`` command, against the same run in 1 process.

Lightning's DDP launcher starts the other ranks by re-running this process's command line (``sys.executable``
plus ``sys.argv``), so the pipeline must be started from something it can re-run: the installed console script.
``python -c "import cli; cli.main()"`` (the helper of tests/test_end_to_end.py) cannot be re-launched: the child is
started as ``python <cwd>/-c ...``, dies at once, and Lightning kills the whole run.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dcccl.artifacts.run_dir import RunDirectory
from tests.commands import command_env
from tests.commands import dcccl as run_dcccl

ROOT = Path(__file__).resolve().parents[1]
# One run takes 5-20 s on 2 CPU cores (more when the machine is busy); a rendezvous or barrier that one rank
# never reaches would otherwise hang the test session for ever.
TIMEOUT_S = 300
PIPELINE = ("pipeline", "--config", "configs/quickstart.yaml", "--rounds", "1", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false")
DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
# A pipeline under DDP prints Lightning's own lines ("Starting with 2 processes", the backend) with --verbose: they
# show that the run was distributed.
PIPELINE_DDP = (*DDP, "--verbose")
PROGRESS = re.compile(r"^\[dcccl quickstart \d+/\d+\] (?P<label>.+): running ", re.MULTILINE)


def dcccl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (Lightning's launcher re-runs it for the other rank), bounded in time."""
    # One thread per process, as Lightning's launcher gives each of 2 ranks on 2 cores: torch's default of one thread
    # per core made the 1-process run 4x slower (80 s instead of 17 s) on 2 cores shared with other work.
    start = time.monotonic()
    result = run_dcccl(*args, script=True, timeout=TIMEOUT_S, env=command_env(OMP_NUM_THREADS="1"))
    print(f"{time.monotonic() - start:5.1f} s: dcccl {' '.join(args)}")
    return result


def artifacts(run_dir: Path) -> list[str]:
    """Relative path of every file of a run, sorted; a Lightning checkpoint counts by its folder only.

    Checkpoint names carry the global step (``epoch=0-step=22.ckpt``): under DDP every rank takes half the batches
    of an epoch, so the names differ from a 1-process run's while the folders and the number of files do not.
    """
    paths = []
    for path in run_dir.rglob("*"):
        if path.is_file():
            relative = path.relative_to(run_dir)
            paths.append((relative.parent / "*.ckpt" if path.suffix == ".ckpt" else relative).as_posix())
    return sorted(paths)


def progress_labels(stderr: str) -> Counter[str]:
    """How often each stage's ``running`` progress line appears."""
    return Counter(match["label"] for match in PROGRESS.finditer(stderr))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_pipeline_under_ddp_matches_one_process_and_resumes(tmp_path: Path) -> None:
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp = dcccl(*PIPELINE, *PIPELINE_DDP, "--run_dir", str(ddp_dir))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "Traceback" not in ddp.stderr, ddp.stderr[-3000:]  # a rank that failed after rank zero was done
    # Really two processes, over gloo (Lightning's backend on CPU).
    assert "distributed_backend=gloo" in ddp.stderr and "Starting with 2 processes" in ddp.stderr
    single = dcccl(*PIPELINE, "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--run_dir", str(single_dir))
    assert single.returncode == 0, single.stderr[-3000:]

    # The same files, written once: rank one writes nothing of its own and nothing half-written is left behind.
    run = RunDirectory(ddp_dir)
    stage_outputs = [run.cloud_submodel, run.control_model, run.cloud_copy(1), run.device_copy(1, 0),
                     run.fused_co_submodel(1), run.round_metrics(1)]
    expected = [run.pipeline_config, run.metrics, run.initial_co_submodel, *stage_outputs]
    expected += [path.parent / "config.yaml" for path in stage_outputs
                 if path not in (run.fused_co_submodel(1), run.device_copy(1, 0))]
    expected.append(run.round_dir(1) / "devices" / "config.yaml")
    missing = [str(path) for path in expected if not path.is_file()]
    assert not missing, missing
    assert artifacts(ddp_dir) == artifacts(single_dir)
    for run_dir in (ddp_dir, single_dir):
        assert not list(run_dir.rglob("*.tmp")), list(run_dir.rglob("*.tmp"))

    ddp_metrics, single_metrics = read_json(ddp_dir / "metrics.json"), read_json(single_dir / "metrics.json")
    assert ddp_metrics.keys() == single_metrics.keys()
    ddp_acc, single_acc = ddp_metrics["served/acc"], single_metrics["served/acc"]
    print(f"served accuracy: 2 processes {ddp_acc:.3f}, 1 process {single_acc:.3f}")
    # Under DDP each rank takes half of every epoch's batches and the gradients are averaged: one epoch is half as
    # many optimizer steps at twice the batch. After one epoch that costs accuracy: measured at seeds 0, 1, 2 the
    # served accuracy is 49.7/50.3/52.5 % under DDP and 63.0/63.4/65.1 % in 1 process, 12.6-13.3 points apart;
    # 1 process with the DDP run's effective batch (128) gives 58.2/37.1/53.6 %, i.e. DDP matches it within the
    # spread of the sample order (docs/multi_gpu.md). Hence 0.2: the measured gap plus a margin. What breaks DDP
    # (ranks that do not synchronise, an export of an untrained copy) shows as accuracy near chance (10 %); a model
    # that knows only the cloud classes stays below 70 % (their share of the test set).
    assert ddp_acc > 0.35 and single_acc > 0.35
    assert abs(ddp_acc - single_acc) < 0.2

    # Progress and results come from global rank zero only: one line per stage, one results table.
    labels = progress_labels(ddp.stderr)
    assert labels["cloud submodel"] == 1
    assert set(labels.values()) == {1} and labels == progress_labels(single.stderr), labels
    assert ddp.stdout.count("DC-CCL results (") == 1 and ddp.stdout.count("served model f + h") == 1

    # Resume under DDP: every stage is found done. (No process is launched then: Lightning starts the other rank
    # only at the first fit or test, and none runs.)
    stamps = {path: path.stat().st_mtime_ns for path in ddp_dir.rglob("*.pt")}
    again = dcccl(*PIPELINE, *PIPELINE_DDP, "--run_dir", str(ddp_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"all {sum(labels.values()) + 1} steps are done already; nothing to run" in again.stderr  # + fusion
    assert not progress_labels(again.stderr)
    assert {path: path.stat().st_mtime_ns for path in ddp_dir.rglob("*.pt")} == stamps
    assert read_json(ddp_dir / "metrics.json") == ddp_metrics
    assert artifacts(ddp_dir) == artifacts(single_dir)

    # Resume with only the evaluation missing: rank zero launches the other rank at the evaluation, and that rank,
    # running the pipeline from the start, must find the same stages done and join the same stage.
    evaluation = next(label for label in labels if label.endswith("evaluation"))
    run.round_metrics(1).unlink()
    partial = dcccl(*PIPELINE, *PIPELINE_DDP, "--run_dir", str(ddp_dir))
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "Traceback" not in partial.stderr and "Starting with 2 processes" in partial.stderr
    assert progress_labels(partial.stderr) == Counter({evaluation: 1})
    assert partial.stderr.count("done already, skipped") == sum(labels.values())  # every other step, fusion included
    assert read_json(ddp_dir / "metrics.json") == ddp_metrics  # the same artifacts, evaluated the same way


FLEET = ("pipeline", "--config", "configs/fleet.yaml", "--rounds", "1", "--fleet.num_devices", "4",
         "--fleet.sample_fraction", "1.0", "--fleet.availability", "1.0", "--trainer.max_epochs", "1",
         "--trainer.enable_progress_bar", "false")


@pytest.mark.slow
def test_ddp_spreads_a_round_s_devices_over_the_ranks_and_fuses_what_one_process_fuses(tmp_path: Path) -> None:
    """The cloud's stages of one 1-process run, then its device round again under DDP: each rank trains other
    devices, and the fused co-submodel is the one the single process fused."""
    import shutil

    import torch

    from dcccl.artifacts.exports import load_export

    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single = dcccl(*FLEET, "--run_dir", str(single_dir))
    assert single.returncode == 0, single.stderr[-3000:]
    shutil.copytree(single_dir, ddp_dir)
    run = RunDirectory(ddp_dir)
    for device in range(4):
        run.device_copy(1, device).unlink()
    shutil.rmtree(run.round_dir(1) / "devices" / "progress")
    # A device failing on rank 1 stops rank 0 too (instead of leaving it waiting at the end of the round).
    failing = dcccl(*FLEET, *PIPELINE_DDP, "--run_dir", str(ddp_dir), "--stage_args",
                    json.dumps({"device": ["--model.class_path=tests.failing_device.FailsOnSecondRank"]}))
    assert failing.returncode != 0
    assert "injected failure of a device on rank 1" in failing.stderr, failing.stderr[-3000:]
    assert "DeviceRoundFailed: the device round failed on 1 other process(es)" in failing.stderr, failing.stderr[-3000:]
    ddp = dcccl(*FLEET, *PIPELINE_DDP, "--run_dir", str(ddp_dir))
    assert ddp.returncode == 0 and "Traceback" not in ddp.stderr, ddp.stderr[-3000:]
    assert "Starting with 2 processes" in ddp.stderr
    assert "cloud submodel: done already, skipped" in ddp.stderr
    budget = read_json(run.round_dir(1) / "devices" / "budget.json")
    ranks = Counter(record["rank"] for record in budget["devices"])
    assert ranks == Counter({0: 2, 1: 2}), budget["devices"]  # each rank trained two of the four devices
    fused = load_export(run.fused_co_submodel(1)).state_dict
    reference = load_export(RunDirectory(single_dir).fused_co_submodel(1)).state_dict
    for key in reference:  # the same copies, fused the same way
        torch.testing.assert_close(fused[key], reference[key], rtol=1e-5, atol=1e-6)
