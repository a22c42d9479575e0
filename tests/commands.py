"""The one way tests run the ``dcccl`` command in a fresh interpreter: a subprocess of the console script's entry
point (or of the installed script itself, which Lightning's DDP launcher can re-run), bounded in time."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Set by torchrun, SLURM or an outer DDP job: inherited, they would make the command believe it is already one rank
# of a larger job (SLURM_* variables are dropped as a whole).
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                      "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")


def command_env(pythonpath: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """The environment of a command: this one, without launcher variables, the repository importable."""
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCHER_VARIABLES and not key.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, str(ROOT)])
    return {**env, **extra}


ENTRY_POINT = "import cli; cli.main()"


def dcccl_command(*args: str, script: bool = False, code: str = ENTRY_POINT) -> list[str]:
    """``dcccl ARGS`` as a command line: the entry point (or ``code`` that calls it) in a fresh interpreter, or the
    installed script."""
    if not script:
        return [sys.executable, "-c", code, *args]
    beside = Path(sys.executable).parent / "dcccl"
    found = str(beside) if beside.is_file() else shutil.which("dcccl")
    if found is None:
        pytest.skip("needs the installed dcccl console script (pip install -e .)")
    return [found, *args]


def dcccl(*args: str, pythonpath: Sequence[str] = (), timeout: float = 600, script: bool = False,
          env: Optional[dict[str, str]] = None, cwd: Path = ROOT,
          preexec_fn: Optional[Callable[[], None]] = None, code: str = ENTRY_POINT) -> subprocess.CompletedProcess[str]:
    """Run ``dcccl ARGS`` from the repository root, stdin closed (nothing may prompt), and return how it ended.

    On timeout its whole process group (DDP ranks included) is killed and the test fails with the output so far.
    """
    with subprocess.Popen(dcccl_command(*args, script=script, code=code), cwd=cwd,
                          env=env if env is not None else command_env(pythonpath), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          preexec_fn=preexec_fn) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"dcccl {' '.join(args)} still running after {timeout} s\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# What a command must not import where it needs none of it (start-up time): Lightning and the modules built on it.
HEAVY_MODULES = ("lightning", "lightning_modules", "datamodules")


def dcccl_imports(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``dcccl ARGS`` in a fresh interpreter, as :func:`dcccl` does; also return which of
    :data:`HEAVY_MODULES` it imported (whether it ended normally or with an error)."""
    code = ("import sys, cli\n"
            "try:\n    cli.main()\n"
            "finally:\n"
            f"    print('IMPORTED=' + ','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules), file=sys.stderr)\n")
    result = dcccl(*args, timeout=timeout, code=code)
    stderr = result.stderr
    marker = [line for line in stderr.splitlines() if line.startswith("IMPORTED=")]
    imported = set(filter(None, marker[-1].removeprefix("IMPORTED=").split(","))) if marker else set(HEAVY_MODULES)
    return result, imported
