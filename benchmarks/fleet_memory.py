"""Peak resident memory of the pipeline with 100 devices against 5 devices, in one run.

Each configuration runs ``dcccl pipeline`` with ``configs/fleet.yaml`` in its own process (every device
trains in round 1, a few steps each) and the process's peak resident set size is read from the kernel
(``os.wait4``). Fusion keeps one running weighted sum, so memory must not grow with the number of devices:
the goal is a ratio of at most 1.5 (the median of the per-repeat ratios; the two configurations run in alternating
turns, ``--repeats`` times each).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repeat import (
    ROOT,
    Spread,
    Verdict,
    add_arguments,
    environment,
    header,
    ratios,
    schedule,
    subprocess_env,
    write_json,
)


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
    process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pipeline with {num_devices} devices failed:\n{process.stderr.read()[-3000:]}")
    return usage.ru_maxrss / 1024, elapsed  # ru_maxrss is in KiB on Linux


def main() -> None:
    """Measure both configurations in alternating turns and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, repeats=3)
    parser.add_argument("--small", type=int, default=5, help="devices of the baseline run")
    parser.add_argument("--large", type=int, default=100, help="devices of the measured run")
    parser.add_argument("--steps", type=int, default=2, help="training steps per stage")
    args = parser.parse_args()
    env = environment()
    print(header(env), flush=True)
    devices = {"small": args.small, "large": args.large}
    mib: dict[str, list[float]] = {"small": [], "large": []}
    seconds: dict[str, list[float]] = {"small": [], "large": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat, side in schedule(("small", "large"), args.repeats):
            peak, took = peak_rss_mib(devices[side], Path(tmp) / f"{side}_{repeat}", args.steps)
            mib[side].append(peak)
            seconds[side].append(took)
            print(f"repeat {repeat + 1}: {devices[side]:>4} devices: peak RSS {peak:8.1f} MiB  ({took:.0f} s)",
                  flush=True)
    for side in ("small", "large"):
        print(f"{devices[side]:>4} devices: peak RSS {Spread.of(mib[side]).describe(1, ' MiB')}")
    verdict = Verdict(f"peak RSS {args.large} / {args.small} devices", Spread.of(ratios(mib["large"], mib["small"])),
                      1.5)
    print(verdict.line())
    write_json(args.json, env, [verdict], steps=args.steps, repeats=args.repeats, **{
        side: {"devices": devices[side], "peak_rss_mib": Spread.of(mib[side]).as_dict(),
               "seconds": Spread.of(seconds[side]).as_dict()} for side in ("small", "large")})


if __name__ == "__main__":
    main()
