"""The spread over seeds behind the accuracy thresholds of the tests: each end-to-end test's set-up run at several
seeds through the real command, one line of figures per seed, then mean +- std.

    python -m tests.spread folder --seeds 0 1 2 3 4 --out /tmp/spread

A test's threshold is set from these figures with a margin its comment gives; run this again on a new machine or
torch before moving one. Each run keeps its run directory under ``--out`` (a second call reuses it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from tests.commands import ROOT, command_env, dcccl_command

# The pipeline arguments of each test's set-up (besides its config, run directory and seed).
SETUPS: dict[str, list[str]] = {
    # tests/test_accuracy.py: scikit-learn's digits as image folders, the quickstart's defaults.
    "folder": [],
    # tests/test_end_to_end.py: the quickstart as it is.
    "quickstart": [],
    # tests/test_compression.py: two rounds with int8 transfers.
    "int8": ["--rounds", "2", "--compression.codec", "int8"],
    # tests/test_predict.py: one round, 20 batches per stage, no validation.
    "predict": ["--rounds", "1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "20",
                "--trainer.limit_val_batches", "0"],
}
KEYS = ("served/acc", "served/acc_device_classes", "cloud_only/acc")


def run_setup(setup: str, seed: int, out: Path) -> dict[str, float]:
    """The metrics of ``setup`` at ``seed`` (the image folders are split with the same seed)."""
    run_dir = out / setup / f"seed_{seed}"
    arguments = ["pipeline", "--config", "configs/quickstart.yaml", "--run_dir", str(run_dir), "--seed_everything",
                 str(seed), "--trainer.enable_progress_bar", "false", *SETUPS[setup]]
    if setup == "folder":
        from tests.test_accuracy import write_digit_folders

        folders = write_digit_folders(out / setup / f"digits_{seed}", seed=seed)
        data = out / setup / f"data_{seed}.yaml"
        data.write_text(yaml.safe_dump({"data": {"class_path": "datamodules.ImageFolderDataModule",
                                                 "init_args": folders}}))
        arguments += ["--data", str(data)]
    if not (run_dir / "metrics.json").is_file():
        result = subprocess.run(dcccl_command(*arguments), cwd=ROOT, env=command_env(), capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise SystemExit(f"{setup} seed {seed} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    figures = {key: 100 * metrics[key] for key in KEYS}
    if setup == "folder":  # the test also checks the control model's agreement with the cloud submodel
        figures["agreement"] = 100 * folder_agreement(run_dir, folders)
    return figures


def folder_agreement(run_dir: Path, folders: dict[str, str]) -> float:
    """How often the control model agrees with the cloud submodel on the cloud's test images."""
    from torch.utils.data import DataLoader

    from datamodules import ImageFolderDataModule
    from dcccl.artifacts.exports import load_network
    from dcccl.federated.costs import control_fidelity

    test = ImageFolderDataModule(**folders).side_test_dataset("cloud")  # type: ignore[arg-type]
    fidelity = control_fidelity(load_network(run_dir / "cloud/cloud_submodel.pt", "cloud_submodel"),
                                load_network(run_dir / "distill/control_model.pt", "control_model"),
                                DataLoader(test, batch_size=256))
    return float(fidelity["agreement"])


def main(argv: list[str] | None = None) -> None:
    """Run one set-up at every seed and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setup", choices=sorted(SETUPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/spread"))
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        rows.append(run_setup(args.setup, seed, args.out.resolve()))
        print(f"seed {seed}: " + ", ".join(f"{key} {value:.1f}" for key, value in rows[-1].items()), flush=True)
    for key in rows[0]:
        values = [row[key] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: {statistics.mean(values):.1f} +- {spread:.1f} (min {min(values):.1f})")


if __name__ == "__main__":
    main(sys.argv[1:])
