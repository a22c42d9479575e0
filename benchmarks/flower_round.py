"""A Flower round's fixed cost: the loopback fleet of ``tests/test_flower.py`` (a real SuperLink and three real
SuperNodes on 127.0.0.1, three devices, every device in every round) run for a few rounds, and per round the time
from the ServerApp sending the round's train messages to the last reply, less the device stage's own seconds.

Per round (round 1 also installs the control model; it is shown apart) the script prints:

* ``wall``: the ServerApp's send -> last reply (``exchanges`` in the round's ``devices/messages.json``);
* ``fit``: the longest device stage of the round (``timing.json`` the ClientApp writes in its round folder);
* ``overhead``: ``wall - fit``, what the round costs besides training;
* its parts, medians over the round's devices: ``to_app`` (send -> the ``flwr-clientapp`` process has loaded
  the app: the SuperNode's and SuperExec's polling, Python and Flower starting), ``imports`` (handler -> device
  stage starting: torch, timm, Lightning, the stage's parser and data), ``back`` (device stage ended -> the
  ServerApp has the reply: writing the copy, the SuperNode's and the ServerApp's polling).

Settings (``--settings``, run in the order given, so ``before,after,before,after`` alternates):

* ``before``: Flower's own pace, ``poll-interval=3.0`` (as ``Grid.send_and_receive``) and SuperExec's default
  1 s task poll;
* ``after``: ``poll-interval=0.2`` (the run config's default) and ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1`` for
  the SuperNodes.

Run from the repository root: ``python benchmarks/flower_round.py [--rounds 3] [--settings before,after]
[--json out.json]``. Needs the flower extra; takes about a minute a round per setting on two cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_flower import (  # noqa: E402
    _free_ports,
    fleet_config,
    flower_env,
    run_to_the_end,
    start_superlink,
    start_supernode,
    stop,
)

SETTINGS: dict[str, tuple[str, dict[str, str]]] = {
    "before": ("poll-interval=3.0", {}),
    "after": ("poll-interval=0.2", {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}),
}


def run_fleet(folder: Path, rounds: int, run_config: str, node_env: dict[str, str]) -> Path:
    """The loopback fleet for ``rounds`` rounds in ``folder``; returns the run directory."""
    import subprocess

    config = fleet_config(folder, rounds=rounds)
    link_port, *node_ports = _free_ports(4)
    env = flower_env(folder / "flwr_home", link_port, **node_env)
    logs = folder / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []
    try:
        processes.append(start_superlink(env, link_port, logs / "superlink.log"))
        for device, port in enumerate(node_ports):
            processes.append(start_supernode(env, link_port, port, device, folder / f"node{device}", logs))
        run_to_the_end(env, config, folder / "run", processes, run_config=run_config)
    finally:
        stop(processes)
    return folder / "run"


def round_times(folder: Path, run_dir: Path, round_index: int) -> dict[str, float]:
    """One round's figures (seconds): wall, fit, overhead and its parts."""
    log = json.loads((run_dir / f"rounds/round_{round_index:03d}/devices/messages.json").read_text())
    train = next(e for e in log["exchanges"] if e["what"].endswith(": training"))
    timings = [json.loads(path.read_text())
               for path in folder.glob(f"node*/run_*/round_{round_index:03d}/timing.json")]
    assert len(timings) == train["messages"], f"round {round_index}: {len(timings)} timing files"
    fit = max(t["fit_ended"] - t["fit_started"] for t in timings)
    wall = train["replied"] - train["sent"]
    return {"wall": wall, "fit": fit, "overhead": wall - fit,
            "to_app": statistics.median(t["app_loaded"] - train["sent"] for t in timings),
            "imports": statistics.median(t["fit_started"] - t["handler_started"] for t in timings),
            "back": statistics.median(train["replied"] - t["fit_ended"] for t in timings),
            "other_exchanges": sum(e["replied"] - e["sent"] for e in log["exchanges"] if e is not train)}


def summary(rows: list[dict[str, float]]) -> str:
    """Median and spread (min-max) of each figure over ``rows``."""
    return "  ".join(f"{key} {statistics.median(r[key] for r in rows):6.2f} "
                     f"[{min(r[key] for r in rows):.2f}-{max(r[key] for r in rows):.2f}]" for key in rows[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--settings", default="before,after", help="comma-separated: before, after")
    parser.add_argument("--json", type=Path, help="also write every round's figures here")
    args = parser.parse_args()
    names = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown or args.rounds < 2:
        parser.error(f"settings are {', '.join(SETTINGS)} (got {unknown}); rounds must be at least 2")
    import flwr
    import torch

    print(f"flwr {flwr.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, load average {open('/proc/loadavg').read().split()[:3]}")
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    for name in names:
        run_config, node_env = SETTINGS[name]
        with tempfile.TemporaryDirectory(prefix=f"flower_round_{name}_") as tmp:
            run_dir = run_fleet(Path(tmp), args.rounds, run_config, node_env)
            for r in range(1, args.rounds + 1):
                figures = {"round": r, **round_times(Path(tmp), run_dir, r)}
                results[name].append(figures)
                print(name, "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in figures.items()), flush=True)
    for name, rows in results.items():
        later = [{k: v for k, v in row.items() if k != "round"} for row in rows if row["round"] > 1]
        if later:
            print(f"{name}: rounds 2+ (n={len(later)}): {summary(later)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
