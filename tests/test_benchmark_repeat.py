"""The benchmarks' repeat rule (``benchmarks/repeat.py``): the alternating order, the median and spread, verdicts."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from tests.commands import ROOT

_spec = importlib.util.spec_from_file_location("benchmark_repeat", ROOT / "benchmarks" / "repeat.py")
assert _spec is not None and _spec.loader is not None
repeat = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = repeat  # dataclasses look their module up there
_spec.loader.exec_module(repeat)


def test_the_order_flips_every_repeat_so_that_no_side_always_goes_first() -> None:
    assert list(repeat.schedule(("A", "B"), 3)) == [(0, "A"), (0, "B"), (1, "B"), (1, "A"), (2, "A"), (2, "B")]
    assert list(repeat.schedule(("a", "b", "c"), 2)) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a")]


def test_spread_of_five_values_worked_out_by_hand() -> None:
    spread = repeat.Spread.of([1.3, 1.0, 1.2, 5.0, 1.1])
    # Sorted 1.0 1.1 1.2 1.3 5.0: median 1.2; inclusive quartiles at positions 1 and 3 (0-based) -> 1.1 and 1.3.
    assert (spread.median, spread.low, spread.high) == (1.2, 1.0, 5.0)
    assert spread.q1 == pytest.approx(1.1) and spread.q3 == pytest.approx(1.3)
    assert spread.values == (1.3, 1.0, 1.2, 5.0, 1.1)  # in the order measured
    assert spread.describe(2, " s") == "median 1.20 s (range 1.00 to 5.00, IQR 1.10 to 1.30, n=5)"


def test_spread_of_one_and_two_values() -> None:
    one = repeat.Spread.of([2.0])
    assert (one.median, one.low, one.high, one.q1, one.q3) == (2.0, 2.0, 2.0, 2.0, 2.0)
    two = repeat.Spread.of([1.0, 3.0])
    assert (two.median, two.q1, two.q3) == (2.0, 1.5, 2.5)
    with pytest.raises(ValueError):
        repeat.Spread.of([])


def test_the_verdict_is_taken_on_the_median_of_the_per_repeat_ratios() -> None:
    # fleet_scale.py's two runs at 10, 100 and 1,000 devices read as repeats: one outlier does not decide.
    values = repeat.ratios([6.0, 13.7, 12.2], [6.0, 10.0, 10.0])
    assert values == pytest.approx([1.0, 1.37, 1.22])
    verdict = repeat.Verdict("ratio", repeat.Spread.of(values), 1.3)
    assert verdict.passed and verdict.within == 2
    assert verdict.line().endswith("target <= 1.3: PASS (2 of 3 repeats within)")
    failed = repeat.Verdict("difference", repeat.Spread.of(repeat.differences([3.0, 4.0], [1.0, 1.0])), 1.5, " s", 2)
    assert not failed.passed and failed.within == 0
    assert failed.as_dict()["median"] == 2.5 and failed.as_dict()["unit"] == "s"
    with pytest.raises(ValueError):
        repeat.ratios([1.0], [1.0, 2.0])


def test_repeats_must_be_positive_and_json_holds_the_environment(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    repeat.add_arguments(parser, repeats=5, python_path=True)
    assert parser.parse_args([]).repeats == 5 and parser.parse_args([]).python_path == ROOT
    with pytest.raises(SystemExit):
        parser.parse_args(["--repeats", "0"])
    env = repeat.environment()
    assert env["versions"]["torch"] and env["cpu_count"]
    verdict = repeat.Verdict("ratio", repeat.Spread.of([1.0, 1.1]), 1.3)
    repeat.write_json(tmp_path / "out.json", env, [verdict], rows=[1, 2])
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["verdicts"][0]["values"] == [1.0, 1.1] and written["rows"] == [1, 2]
    assert "load_average_end" in written["environment"]


def test_the_tree_measured_comes_first_on_the_childrens_path(tmp_path: Path) -> None:
    assert repeat.subprocess_env(tmp_path)["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
