"""How long a re-run of a finished pipeline takes to find that nothing needs doing, against the command's own
start-up (``dcccl --help``, which imports Lightning and everything else the command imports) in the same run.

Target: the no-op re-run at most 1.5 s slower than ``dcccl --help``.

    python benchmarks/noop_rerun.py                      # finishes the quickstart first if the run directory lacks it
    python benchmarks/noop_rerun.py --repeats 5 --json /tmp/noop.json

Run it from the repository root with the project installed. The pipeline run it needs is written to a temporary
folder (``--run_dir`` keeps it elsewhere).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.5


def dcccl(*args: str) -> float:
    """Seconds of one ``dcccl ARGS`` in a fresh interpreter (exit status checked)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cli; cli.main()", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    """Finish the quickstart once, then time ``--help`` and the no-op re-run in turns."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Timed pairs (default 3).")
    parser.add_argument("--run_dir", type=Path, default=None, help="Where the quickstart run is (default: a temp dir).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results as JSON.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / "quickstart"
        pipeline = ("pipeline", "--config", "configs/quickstart.yaml", "--run_dir", str(run_dir))
        print(f"finishing the quickstart in {run_dir} ({dcccl(*pipeline):.1f} s)")
        help_s, noop_s = [], []
        for repeat in range(args.repeats):
            help_s.append(dcccl("--help"))
            noop_s.append(dcccl(*pipeline))
            print(f"repeat {repeat + 1}: dcccl --help {help_s[-1]:.2f} s, no-op re-run {noop_s[-1]:.2f} s")
    help_median, noop_median = statistics.median(help_s), statistics.median(noop_s)
    extra = noop_median - help_median
    verdict = "PASS" if extra <= TARGET_S else "FAIL"
    print(f"median: dcccl --help {help_median:.2f} s, no-op re-run {noop_median:.2f} s, "
          f"difference {extra:+.2f} s (target <= {TARGET_S} s: {verdict})")
    if args.json is not None:
        args.json.write_text(json.dumps({"help_s": help_s, "noop_s": noop_s, "difference_s": extra,
                                         "target_s": TARGET_S, "verdict": verdict}, indent=2))


if __name__ == "__main__":
    main()
