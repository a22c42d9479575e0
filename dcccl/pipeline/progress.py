"""How far a run is and how long it has left: the estimate behind the progress lines and the progress display.

Each step has a kind (its stage, or ``fusion``). Steps of one kind take about as long as each other (a run's rounds
repeat), so the time left is the sum, over the steps still to run, of the mean time the finished steps of their kind
took; a kind that has not run yet counts as the mean step. Pure: the coordinator feeds it, nothing reads a clock here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from dcccl.pipeline.steps import LocalStep, StageCall, Step

# What a progress line carries for a display (``logging``'s ``extra``), by the record's attribute name: where the run
# is (a step's position, the steps, the time so far and left), and where a device round is (devices done, devices).
PROGRESS_FIELD = "dcccl_progress"
DEVICES_FIELD = "dcccl_devices"


def step_kind(step: Step) -> str:
    """The kind of ``step``: its stage (``cloud``, ``device``...), or ``fusion`` for a local step."""
    if isinstance(step, StageCall):
        return step.stage
    return "fusion" if isinstance(step, LocalStep) else type(step).__name__


def time_left(durations: dict[str, list[float]], remaining: Sequence[str]) -> Optional[float]:
    """Seconds the ``remaining`` kinds of step should take, from the ``durations`` of finished steps by kind
    (``None``: nothing has finished, so there is nothing to go by)."""
    finished = [seconds for kind in durations.values() for seconds in kind]
    if not finished:
        return None
    overall = sum(finished) / len(finished)
    means = {kind: sum(times) / len(times) for kind, times in durations.items() if times}
    return sum(means.get(kind, overall) for kind in remaining)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, int(math.ceil(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class RunProgress:
    """The steps a run will run (their kinds, in order) and how long the finished ones took.

    Args:
        kinds: The kind of every step that runs, in order.
    """

    kinds: list[str]
    durations: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    done: int = 0

    def finished(self, seconds: float) -> None:
        """The next step finished after ``seconds``."""
        self.durations[self.kinds[self.done]].append(seconds)
        self.done += 1

    @property
    def time_left(self) -> Optional[float]:
        """The estimate of the seconds the remaining steps take (``None``: no step has finished yet)."""
        return time_left(self.durations, self.kinds[self.done:])

    def fields(self, position: int, total: int, label: str, elapsed: float) -> dict[str, object]:
        """What a progress line tells a display: the step, the steps, the elapsed and the estimated seconds."""
        return {"position": position, "total": total, "label": label, "elapsed": elapsed,
                "left": self.time_left, "done": self.done, "runs": len(self.kinds)}
