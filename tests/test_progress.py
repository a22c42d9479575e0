"""The run's progress: the time left from the steps that finished, by kind, and what the command prints of it."""

from __future__ import annotations

import io
import logging

import pytest

from dcccl.commands.console import ProgressDisplay
from dcccl.pipeline.progress import PROGRESS_FIELD, RunProgress, format_seconds, time_left


def test_the_time_left_is_each_remaining_step_at_the_mean_of_its_kind() -> None:
    assert time_left({}, ["cloud"]) is None  # nothing finished: nothing to go by
    durations = {"cloud": [10.0], "device": [4.0, 6.0], "fusion": [1.0]}
    # Two more rounds of device + fusion + evaluate; evaluate has not run yet: it counts as the mean step (5.25 s).
    assert time_left(durations, ["device", "fusion", "evaluate"] * 2) == pytest.approx(2 * (5.0 + 1.0 + 5.25))
    assert time_left(durations, []) == 0.0


def test_a_run_s_progress_follows_the_steps_that_run() -> None:
    progress = RunProgress(["cloud", "distill", "device", "evaluate", "device", "evaluate"])
    assert progress.time_left is None
    for seconds in (20.0, 10.0, 6.0, 2.0):
        progress.finished(seconds)
    assert progress.done == 4
    assert progress.time_left == pytest.approx(6.0 + 2.0)  # one more round, at the first round's pace
    fields = progress.fields(5, 6, "round 2/2: devices", 38.0)
    assert fields == {"position": 5, "total": 6, "label": "round 2/2: devices", "elapsed": 38.0, "left": 8.0,
                      "done": 4, "runs": 6}


@pytest.mark.parametrize(("seconds", "text"), [(0.2, "1 s"), (42, "42 s"), (185, "3 min 05 s"), (3720, "1 h 02 min")])
def test_durations_read_as_a_person_would_say_them(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_the_display_prints_every_line_and_ends_with_the_run() -> None:
    from rich.console import Console

    display = ProgressDisplay(Console(file=io.StringIO(), force_terminal=True, width=120))
    display.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("dcccl", logging.INFO, __file__, 1, "[dcccl run 1/2] cloud: finished", None, None)
    setattr(record, PROGRESS_FIELD, {"position": 1, "total": 2, "label": "cloud", "elapsed": 3.0, "left": 3.0,
                                     "done": 1, "runs": 2})
    display.emit(record)
    assert display.task is not None and display.bar.tasks[0].completed == 1
    last = logging.LogRecord("dcccl", logging.INFO, __file__, 1, "[dcccl run 2/2] evaluate: finished", None, None)
    setattr(last, PROGRESS_FIELD, {"position": 2, "total": 2, "label": "evaluate", "elapsed": 6.0, "left": 0.0,
                                   "done": 2, "runs": 2})
    display.emit(last)
    assert display.task is None  # the bar is gone once the last step finished
    printed = display.console.file.getvalue()  # type: ignore[attr-defined]
    assert "cloud: finished" in printed and "evaluate: finished" in printed
