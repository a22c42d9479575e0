"""Peak resident memory of the pipeline with 100 devices against 5 devices, in one run.

Each configuration runs ``dcccl pipeline`` with ``configs/fleet.yaml`` in its own process (every device
trains in round 1, a few steps each) and the process's peak resident set size is read from the kernel
(``os.wait4``). Fusion keeps one running weighted sum, so memory must not grow with the number of devices:
the goal is a ratio of at most 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib(num_devices: int, run_dir: Path, steps: int) -> tuple[float, float]:
    """Run the fleet pipeline with ``num_devices`` devices; return (peak RSS in MiB, seconds)."""
    command = [
        sys.executable, "-c", "import cli; cli.main()", "pipeline", "--config", "configs/fleet.yaml",
        "--run_dir", str(run_dir), "--rounds", "1", "--fleet.num_devices", str(num_devices),
        "--fleet.sample_fraction", "1.0", "--fleet.availability", "1.0",
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2",
        "--trainer.enable_progress_bar", "false",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pipeline with {num_devices} devices failed:\n{process.stderr.read()[-3000:]}")
    return usage.ru_maxrss / 1024, elapsed  # ru_maxrss is in KiB on Linux


def main() -> None:
    """Measure both configurations and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=5, help="devices of the baseline run")
    parser.add_argument("--large", type=int, default=100, help="devices of the measured run")
    parser.add_argument("--steps", type=int, default=2, help="training steps per stage")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = peak_rss_mib(args.small, Path(tmp) / "small", args.steps)
        large = peak_rss_mib(args.large, Path(tmp) / "large", args.steps)
    ratio = large[0] / small[0]
    print(f"{args.small:>4} devices: peak RSS {small[0]:8.1f} MiB  ({small[1]:.0f} s)")
    print(f"{args.large:>4} devices: peak RSS {large[0]:8.1f} MiB  ({large[1]:.0f} s)")
    print(f"ratio {ratio:.3f}  target <= 1.5: {'PASS' if ratio <= 1.5 else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"small": {"devices": args.small, "peak_rss_mib": small[0]},
                                         "large": {"devices": args.large, "peak_rss_mib": large[0]},
                                         "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
