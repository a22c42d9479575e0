"""How long a re-run of a finished pipeline takes to find that nothing needs doing, against the command's own
start-up (``dcccl --help``) in the same run.

Target: the no-op re-run at most 1.5 s slower than ``dcccl --help`` (the median of the per-repeat differences).

    python benchmarks/noop_rerun.py                      # finishes the quickstart first if the run directory lacks it
    python benchmarks/noop_rerun.py --repeats 5 --json /tmp/noop.json

Run it from the repository root. The pipeline run it needs is written to a temporary folder (``--run_dir`` keeps
it elsewhere); ``--python_path`` picks the source tree measured (default: this repository).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from repeat import (
    ROOT,
    Spread,
    Verdict,
    add_arguments,
    differences,
    environment,
    header,
    schedule,
    subprocess_env,
    write_json,
)

TARGET_S = 1.5
SIDES = ("--help", "no-op re-run")


def dcccl(args: Sequence[str], tree: Path = ROOT) -> float:
    """Seconds of one ``dcccl ARGS`` of the source ``tree`` in a fresh interpreter (exit status 0 checked)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "import cli; cli.main()", *args], cwd=tree,
                            env=subprocess_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(f"dcccl {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def quickstart(run_dir: Path) -> tuple[str, ...]:
    """The arguments of the quickstart pipeline into ``run_dir``."""
    return ("pipeline", "--config", "configs/quickstart.yaml", "--run_dir", str(run_dir))


def finish_quickstart(run_dir: Path, tree: Path = ROOT) -> None:
    """Run (or resume) the quickstart into ``run_dir`` so that a later run of it has nothing to do."""
    print(f"finishing the quickstart in {run_dir} ...", flush=True)
    print(f"finished in {dcccl(quickstart(run_dir), tree):.1f} s", flush=True)


def main() -> None:
    """Finish the quickstart once, then time ``--help`` and the no-op re-run in alternating turns."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, repeats=5, python_path=True)
    parser.add_argument("--run_dir", type=Path, default=None, help="Where the quickstart run is (default: a temp dir).")
    args = parser.parse_args()
    tree = args.python_path.resolve()
    env = environment(tree)
    print(header(env), flush=True)
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = (args.run_dir or Path(tmp) / "quickstart").resolve()
        finish_quickstart(run_dir, tree)
        for repeat, side in schedule(SIDES, args.repeats):
            seconds[side].append(dcccl(("--help",) if side == "--help" else quickstart(run_dir), tree))
            print(f"repeat {repeat + 1}: {side} {seconds[side][-1]:.2f} s", flush=True)
    for side in SIDES:
        print(f"{side}: {Spread.of(seconds[side]).describe(2, ' s')}")
    verdict = Verdict("no-op re-run - dcccl --help", Spread.of(differences(seconds[SIDES[1]], seconds[SIDES[0]])),
                      TARGET_S, " s", 2)
    print(verdict.line())
    write_json(args.json, env, [verdict], order=list(SIDES), repeats=args.repeats,
               seconds={side: Spread.of(values).as_dict() for side, values in seconds.items()})


if __name__ == "__main__":
    main()
