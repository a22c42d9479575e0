"""What the ``dcccl`` command imports before it runs anything: its help and its argument errors need neither
Lightning nor the stage modules (importing Lightning takes seconds). The re-run of a finished run, which needs none of
them either, is checked in tests/test_end_to_end.py."""

from __future__ import annotations

import pytest

from tests.commands import dcccl_imports


def test_the_overview_lists_every_command_and_imports_nothing_heavy() -> None:
    result, imported = dcccl_imports("--help")
    assert result.returncode == 0 and imported == set()
    for command in ("pipeline", "compare", "ablate", "export", "audit", "fit, validate, test, predict"):
        assert command in result.stdout


@pytest.mark.parametrize("args", [("pipeline", "--help"), ("compare", "--help"), ("export", "--help")])
def test_a_command_s_help_imports_nothing_heavy(args: tuple[str, ...]) -> None:
    result, imported = dcccl_imports(*args)
    assert result.returncode == 0 and imported == set()
    assert "--config" in result.stdout or "--run_dir" in result.stdout


def test_an_argument_error_is_one_line_and_imports_nothing_heavy() -> None:
    result, imported = dcccl_imports("pipeline", "--config", "configs/quickstart.yaml", "--rounds", "x")
    assert result.returncode == 2 and imported == set()
    errors = [line for line in result.stderr.splitlines() if line.startswith("dcccl pipeline: error:")]
    assert len(errors) == 1 and "rounds" in errors[0] and "Traceback" not in result.stderr


def test_a_stage_command_still_goes_through_lightning() -> None:
    result, imported = dcccl_imports("fit", "--help")
    assert result.returncode == 0 and "lightning" in imported
    assert "--trainer" in result.stdout
