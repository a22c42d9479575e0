"""What every benchmark shares: repeated, alternating measurements summarised by their median and spread.

The rule (benchmarks/README.md): a benchmark repeats its measurement ``--repeats`` times, runs the sides it
compares in turns whose order flips every repeat (A B, B A, A B, ...) so that drift of the machine hits every
side alike, prints every repeat's values, and reports each figure as its median with the range (min-max) and
the interquartile range. A target is judged on the **median of the per-repeat figures** (e.g. each repeat's
ratio of its two sides), and the verdict line also says how many repeats were within the target.

    from repeat import Spread, Verdict, add_arguments, environment, header, schedule, write_json

The benchmark scripts import it as ``repeat`` (their own folder is first on ``sys.path`` when run as
``python benchmarks/NAME.py``); nothing in it imports torch or Lightning.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, TypeVar

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "lightning", "torchmetrics", "timm", "jsonargparse")
T = TypeVar("T")


def schedule(sides: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """``(repeat, side)`` in the order to run them: every repeat runs every side, in the given order on even
    repeats and reversed on odd ones (A B, B A, A B, ...), so that neither side always goes first."""
    for repeat in range(repeats):
        for side in sides if repeat % 2 == 0 else reversed(sides):
            yield repeat, side


@dataclass(frozen=True)
class Spread:
    """A figure measured several times: every value, the median, the range and the interquartile range.

    Args:
        values: Every repeat's value, in the order measured.
        median: Their median.
        low: The smallest value.
        high: The largest value.
        q1: The first quartile (inclusive method; equal to the value when there is one).
        q3: The third quartile.
    """

    values: tuple[float, ...]
    median: float
    low: float
    high: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """Summarise ``values`` (at least one)."""
        if not values:
            raise ValueError("a spread needs at least one value")
        data = tuple(float(value) for value in values)
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive") if len(data) > 1 else (data[0],) * 3
        return cls(data, statistics.median(data), min(data), max(data), q1, q3)

    def describe(self, digits: int = 3, unit: str = "") -> str:
        """``median 1.079 s (range 1.046 to 1.097, IQR 1.060 to 1.090, n=5)``."""
        def f(value: float) -> str:
            return f"{value:.{digits}f}"

        return (f"median {f(self.median)}{unit} (range {f(self.low)} to {f(self.high)}, "
                f"IQR {f(self.q1)} to {f(self.q3)}, n={len(self.values)})")

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: every value and the summary."""
        return {"values": list(self.values), "median": self.median, "min": self.low, "max": self.high,
                "q1": self.q1, "q3": self.q3}


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """The per-repeat ratios ``numerators[i] / denominators[i]`` (both sides measured in the same repeat)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators against {len(denominators)} denominators")
    return [a / b for a, b in zip(numerators, denominators)]


def differences(minuends: Sequence[float], subtrahends: Sequence[float]) -> list[float]:
    """The per-repeat differences ``minuends[i] - subtrahends[i]``."""
    if len(minuends) != len(subtrahends):
        raise ValueError(f"{len(minuends)} values against {len(subtrahends)}")
    return [a - b for a, b in zip(minuends, subtrahends)]


@dataclass(frozen=True)
class Verdict:
    """A target judged on the median of a figure's repeats (the figure must be at most ``target``).

    Args:
        label: What the figure is, e.g. ``"ratio dcccl / plain, 100 devices"``.
        spread: The figure's repeats.
        target: The largest acceptable median.
        unit: Printed after the numbers (``" s"``), empty for ratios.
        digits: Decimals printed.
    """

    label: str
    spread: Spread
    target: float
    unit: str = ""
    digits: int = 3

    @property
    def passed(self) -> bool:
        """Whether the median is within the target."""
        return self.spread.median <= self.target

    @property
    def within(self) -> int:
        """How many repeats were within the target on their own."""
        return sum(value <= self.target for value in self.spread.values)

    def line(self) -> str:
        """``LABEL: median ... ; target <= T: PASS (4 of 5 repeats within)``."""
        return (f"{self.label}: {self.spread.describe(self.digits, self.unit)}; target <= {self.target}{self.unit}: "
                f"{'PASS' if self.passed else 'FAIL'} ({self.within} of {len(self.spread.values)} repeats within)")

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"label": self.label, **self.spread.as_dict(), "target": self.target, "unit": self.unit.strip(),
                "passed": self.passed, "repeats_within": self.within}


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser, repeats: int, python_path: bool = False) -> None:
    """``--repeats N`` (default ``repeats``) and ``--json PATH``, the options every benchmark has, and with
    ``python_path`` the ``--python_path DIR`` of those that run ``dcccl`` commands of a source tree."""
    parser.add_argument("--repeats", type=positive_int, default=repeats,
                        help=f"measurements of every side, alternating their order (default {repeats})")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    if python_path:
        parser.add_argument("--python_path", type=Path, default=ROOT, metavar="DIR",
                            help="the source tree measured: its PYTHONPATH and working directory (default: this one)")


def subprocess_env(python_path: Path = ROOT) -> dict[str, str]:
    """This process's environment with ``python_path`` first on ``PYTHONPATH`` (the source tree measured)."""
    rest = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(python_path) + (os.pathsep + rest if rest else "")}


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _commit(tree: Path) -> Optional[str]:
    try:
        result = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False)
    except OSError:
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return result.stdout.strip() + ("+changes" if dirty else "")


def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 minute load averages (``None`` where the system has none): other work on the machine."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def environment(tree: Path = ROOT) -> dict[str, Any]:
    """Versions (read from the installed metadata, importing nothing), the CPU, the load and the measured tree."""
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "cpu_count": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform(),
            "load_average_start": load_average(), "tree": str(tree), "commit": _commit(tree),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]]}


def header(env: dict[str, Any]) -> str:
    """One line of ``environment()``: what a figure was measured with."""
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    load = env["load_average_start"]
    return (f"{versions}; {env['cpu_count']} CPUs ({env['cpu']}); load average {load}; "
            f"tree {env['tree']} at {env['commit']}")


def write_json(path: Optional[Path], env: dict[str, Any], verdicts: Sequence[Verdict], **results: Any) -> None:
    """Print the load average at the end; write ``env``, the verdicts and ``results`` to ``path`` when given."""
    end = load_average()
    print(f"load average at the end: {end} (at the start: {env['load_average_start']})")
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": {**env, "load_average_end": end}, "verdicts": [v.as_dict() for v in verdicts],
               **results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results written to {path}")
