"""Start-up cost of the ``dcccl`` commands that should not need Lightning, and whether they import it.

Each command runs in a fresh interpreter, ``--repeats`` times, the commands in turns whose order flips every
repeat; the figures are each command's median wall time with its range and interquartile range:

- ``python -c pass``: the bare interpreter;
- ``python -c "import lightning"``: what importing Lightning costs on its own (the reference);
- ``dcccl --help``, ``dcccl pipeline --help``;
- an argument error, ``dcccl pipeline --rounds x`` (exit status 2);
- the no-op re-run of a finished quickstart run (the quickstart is run once first into a temporary folder, or
  into ``--run_dir``, where a finished run makes that a no-op too).

Every command runs under a small wrapper that calls ``cli.main(argv)``, catches its ``SystemExit`` and then
writes to a file whether ``lightning``, ``torch``, the stage modules (``lightning_modules``) and the DataModules
(``datamodules``) are in ``sys.modules``; the wrapper's own cost is a file write. The goal (issue: "``dcccl --help``,
argument errors and the no-op re-run without importing Lightning or the stage modules where they are not needed")
is printed as met when none of those three imports ``lightning`` or ``lightning_modules``.

    python benchmarks/startup.py                                   # this tree, 5 repeats
    python benchmarks/startup.py --python_path /path/to/other/checkout --json /tmp/startup_after.json

``--python_path`` is the source tree measured (its ``PYTHONPATH`` and working directory), so the same script
measures two trees, e.g. before and after a change.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noop_rerun import finish_quickstart, quickstart
from repeat import Spread, add_arguments, environment, header, schedule, subprocess_env, write_json

WATCHED = ("lightning", "torch", "lightning_modules", "datamodules")
LIGHTNING_FREE = ("dcccl --help", "argument error", "no-op re-run")

# Runs ``cli.main(argv)`` (or ``exec`` of Python code), then writes the exit status, the top-level modules loaded
# and where ``cli`` came from (checked to lie in the tree measured).
PROBE = """
import json, sys
report, kind, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
status = 1
try:
    if kind == "code":
        exec(argv[0], {"__name__": "__main__"})
    else:
        import cli
        cli.main(argv)
    status = 0
except SystemExit as stop:
    status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
finally:
    with open(report, "w") as file:
        json.dump({"status": status, "modules": len(sys.modules),
                   "cli": getattr(sys.modules.get("cli"), "__file__", None),
                   "top_level": sorted({name.split(".")[0] for name in sys.modules})}, file)
raise SystemExit(status)
"""


@dataclass(frozen=True)
class Command:
    """One measured command.

    Args:
        name: Its name in the output.
        kind: ``"dcccl"`` (``argv`` are the command's arguments) or ``"code"`` (``argv[0]`` is Python code).
        argv: See ``kind``.
        status: The exit status it must end with.
    """

    name: str
    kind: str
    argv: tuple[str, ...]
    status: int = 0


def commands(run_dir: Path) -> tuple[Command, ...]:
    """Every measured command, the references first."""
    return (
        Command("python", "code", ("pass",)),
        Command("import lightning", "code", ("import lightning",)),
        Command("dcccl --help", "dcccl", ("--help",)),
        Command("dcccl pipeline --help", "dcccl", ("pipeline", "--help")),
        Command("argument error", "dcccl", ("pipeline", "--rounds", "x"), status=2),
        Command("no-op re-run", "dcccl", quickstart(run_dir)),
    )


def run(command: Command, tree: Path, report: Path) -> tuple[float, dict[str, Any]]:
    """Seconds of ``command`` in a fresh interpreter of the source ``tree`` and what its probe reported."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE, str(report), command.kind, *command.argv], cwd=tree,
                            env=subprocess_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            check=False)
    seconds = time.perf_counter() - started
    if result.returncode != command.status:
        raise SystemExit(f"{command.name} ended with {result.returncode}, expected {command.status}:\n"
                         f"{result.stderr[-3000:]}")
    probe = json.loads(report.read_text())
    if command.kind == "dcccl" and not (probe["cli"] and Path(probe["cli"]).resolve().is_relative_to(tree)):
        raise SystemExit(f"{command.name} ran the cli.py at {probe['cli']}, not the one of {tree}")
    return seconds, probe


def _yes_no(flags: list[bool]) -> str:
    return "yes" if all(flags) else "no" if not any(flags) else "mixed"


def main() -> None:
    """Finish the quickstart once, then time every command in alternating turns and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, repeats=5, python_path=True)
    parser.add_argument("--run_dir", type=Path, default=None,
                        help="A finished quickstart run to re-run (default: one made in a temporary folder).")
    args = parser.parse_args()
    tree = args.python_path.resolve()
    env = environment(tree)
    print(header(env), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = (args.run_dir or Path(tmp) / "quickstart").resolve()
        finish_quickstart(run_dir, tree)
        measured = commands(run_dir)
        seconds: dict[str, list[float]] = {command.name: [] for command in measured}
        imported: dict[str, dict[str, list[bool]]] = {c.name: {m: [] for m in WATCHED} for c in measured}
        modules: dict[str, list[int]] = {command.name: [] for command in measured}
        for repeat, command in schedule(measured, args.repeats):
            took, probe = run(command, tree, Path(tmp) / "probe.json")
            seconds[command.name].append(took)
            modules[command.name].append(probe["modules"])
            for module in WATCHED:
                imported[command.name][module].append(module in probe["top_level"])
            loaded = ", ".join(module for module in WATCHED if module in probe["top_level"]) or "none of them"
            print(f"repeat {repeat + 1}: {command.name:<22} {took:6.2f} s  (imported: {loaded})", flush=True)
    print()
    print(f"{'command':<22} {'median s':>9} {'range s':>13} {'IQR s':>13} {'modules':>8}  "
          + "  ".join(f"{module:>17}" for module in WATCHED))
    rows = []
    for command in measured:
        spread = Spread.of(seconds[command.name])
        flags = {module: _yes_no(imported[command.name][module]) for module in WATCHED}
        print(f"{command.name:<22} {spread.median:9.2f} {spread.low:6.2f}-{spread.high:<6.2f} "
              f"{spread.q1:6.2f}-{spread.q3:<6.2f} {max(modules[command.name]):8d}  "
              + "  ".join(f"{flags[module]:>17}" for module in WATCHED))
        rows.append({"command": command.name, "argv": list(command.argv), "exit_status": command.status,
                     "seconds": spread.as_dict(), "modules": modules[command.name], "imported": flags})
    heavy = [name for name in LIGHTNING_FREE
             if any(imported[name]["lightning"]) or any(imported[name]["lightning_modules"])]
    print(f"goal: {', '.join(LIGHTNING_FREE)} without Lightning or the stage modules: "
          + ("MET" if not heavy else f"NOT MET ({', '.join(heavy)} import them)"))
    write_json(args.json, env, [], commands=rows, order=[command.name for command in measured],
               repeats=args.repeats, goal_met=not heavy, importing_lightning=heavy)


if __name__ == "__main__":
    main()
