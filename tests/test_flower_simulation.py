"""DC-CCL on Flower's simulation runtime: the same Flower App, run by a SuperLink in simulation mode, its devices
virtual SuperNodes in Ray actors, against ``dcccl pipeline`` with the same fleet config and seed, as the loopback
test runs it on real SuperNodes. Needs the simulation extra (``pip install -e ".[flower,simulation]"``, which pulls
Ray); skipped without it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import require_extra

require_extra("flwr")
require_extra("ray")

from tests.test_flower import (  # noqa: E402
    _free_ports,
    assert_serves_what_the_pipeline_serves,
    fleet_config,
    flower_env,
    pipeline_reference,
    run_to_the_end,
    start_superlink,
    stop,
)

# What Ray may take on a CI machine of two cores: both cores, a small object store (the messages are a few hundred
# kilobytes), no dashboard (Flower's default), no usage report.
RAY_OBJECT_STORE_BYTES = 100 * 2**20
# One actor per core, each running one virtual node's message at a time.
FEDERATION_CONFIG = "client-resources-num-cpus=1 init-args-num-cpus=2"


def processes_with(marker: str) -> dict[int, str]:
    """This user's live processes whose environment holds ``marker``, by pid, with their command lines (Ray's raylet,
    GCS server, workers and actors inherit the environment of the process that started Ray)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def ray_processes(marker: str, timeout: float) -> dict[int, str]:
    """The processes of ``marker`` that are neither Flower's nor gone within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid: command for pid, command in processes_with(marker).items()
                if not any(name in command for name in ("flower-superlink", "flower-superexec", "flwr-simulation"))}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def run_on_simulation(tmp_path: Path, config: Path, run_dir: Path, nodes: int = 3) -> dict[int, str]:
    """Run ``config`` through the Flower App on Flower's simulation runtime with ``nodes`` virtual SuperNodes, Ray
    limited to this machine's two cores. Returns the Ray processes still alive once the run finished (killed since)."""
    (link_port,) = _free_ports(1)
    ray_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    marker = f"RAY_TMPDIR={ray_dir}"
    env = flower_env(tmp_path / "flwr_home", link_port, RAY_TMPDIR=str(ray_dir), RAY_ADDRESS="",
                     RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES=str(RAY_OBJECT_STORE_BYTES),
                     RAY_USAGE_STATS_ENABLED="0")
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []
    try:
        processes.append(start_superlink(env, link_port, logs / "superlink.log", "--simulation"))
        run_to_the_end(env, config, run_dir, processes, "--federation-config",
                       f"num-supernodes={nodes} {FEDERATION_CONFIG}",
                       run_config=f'node-state-dir="{tmp_path / "nodes"}"')
        survivors = ray_processes(marker, timeout=20)  # Ray is shut down before the run reports its end
    finally:
        stop(processes)
        for pid in processes_with(marker):  # whatever the run left: only processes started with our RAY_TMPDIR
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        assert not ray_processes(marker, timeout=10), "Ray processes survived being killed"
        shutil.rmtree(ray_dir, ignore_errors=True)
    return survivors


@pytest.mark.slow
def test_a_simulated_fleet_on_flower_serves_what_the_pipeline_serves(tmp_path: Path) -> None:
    config = fleet_config(tmp_path)
    reference = pipeline_reference(tmp_path, config)
    run_dir = tmp_path / "simulation"
    survivors = run_on_simulation(tmp_path, config, run_dir)

    assert survivors == {}, f"Ray processes outlived the run: {survivors}"
    kept = sorted(tmp_path.glob("nodes/partition_*/run_*/**/*.pt"))
    assert {path.relative_to(tmp_path / "nodes").parts[0] for path in kept} == {f"partition_{d}" for d in range(3)}
    assert_serves_what_the_pipeline_serves(reference, run_dir, kept)
