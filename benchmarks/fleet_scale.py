"""One round's device training for many devices: dcccl's device round against a plain PyTorch loop, in one run.

For each device count the script starts one process per side (so that each has its own peak resident memory):

- **dcccl**: :class:`lightning_modules.DeviceRoundModule` wrapping the device stage module of
  ``configs/stages/device.yaml`` (margin 1.0, Adam lr 0.003, budget floors 2 epochs and ``--min-steps`` steps),
  fitted by one Lightning ``Trainer`` over all the round's devices, each copy written to its own file;
- **plain**: the same template network, the same per-device loaders (the DataModule's ``device_loader``), the same
  loss, optimizer and floors, in a ``for`` loop over the devices, each copy saved with ``torch.save``.

Both start from the same control model and co-submodel (fresh ``small_cnn`` width 8, as the quickstart's) on the
bundled digits, the device side divided among ``N`` devices (Dirichlet 0.5). The DataModule is loaded before the
clock starts on both sides. Each count runs ``--repeats`` times per side, the sides in alternating turns (plain
first, then dcccl first, ...). Figures, each the median of the repeats with its spread: seconds per side, their
per-repeat ratio (target: a median of at most 1.3), the largest weight difference between the two sides' copies
(0: both did the same steps), each process's peak resident memory, and dcccl's memory of the largest count against
the smallest (target at most 1.5).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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

SIDES = ("plain", "dcccl")


def _setup(workdir: Path, num_devices: int) -> tuple[Any, Path, Path]:
    """The fleet's DataModule (loaded) and a control model and start co-submodel written under ``workdir``."""
    import torch

    from datamodules.mnist import BundledMNISTDataModule
    from dcccl.artifacts.exports import NetworkExport, save_export
    from dcccl.backbones.spec import BackboneSpec

    data = BundledMNISTDataModule(batch_size=64, seed=0, num_devices=num_devices, device_partitioner="dirichlet",
                                  dirichlet_alpha=0.5)
    _ = data.device_parts  # load and divide before the clock starts
    spec = BackboneSpec("small_cnn", kwargs={"width": 8})
    paths = []
    for seed, role in ((1, "control_model"), (2, "co_submodel")):
        torch.manual_seed(seed)
        path = workdir / f"{role}.pt"
        save_export(NetworkExport.of(spec.build(10, 1), role, spec, 10, 1), path)  # type: ignore[arg-type]
        paths.append(path)
    return data, paths[0], paths[1]


def _template(control: Path, start: Path, min_steps: int) -> Any:
    from lightning_modules import DeviceCoTrainingModule
    from lightning_modules.training_budget import TrainingBudget

    return DeviceCoTrainingModule(10, 1, control_model=str(control), co_submodel=str(start), margin=1.0,
                                  budget=TrainingBudget(monitor=None, min_epochs=2, min_steps=min_steps),
                                  optimizer=lambda params: __import__("torch").optim.Adam(params, lr=0.003))


def run_dcccl(workdir: Path, num_devices: int, min_steps: int) -> float:
    """The device round through Lightning; returns seconds."""
    from lightning.pytorch import Trainer

    from dcccl.pipeline.steps import DeviceTask
    from lightning_modules import DeviceRoundModule

    data, control, start = _setup(workdir, num_devices)
    tasks = [DeviceTask(d, start, workdir / "copies" / f"device_{d:04d}.pt") for d in range(num_devices)]
    began = time.perf_counter()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(workdir / "round"))
    trainer.fit(DeviceRoundModule(_template(control, start, min_steps), tasks), datamodule=data)
    return time.perf_counter() - began


def run_plain(workdir: Path, num_devices: int, min_steps: int) -> float:
    """The same steps in a plain loop; returns seconds."""
    import torch

    from dcccl.artifacts.exports import load_export

    data, control, start = _setup(workdir, num_devices)
    began = time.perf_counter()
    module = _template(control, start, min_steps)
    start_state = load_export(start).state_dict
    for device in range(num_devices):
        module.co_submodel.load_state_dict(start_state)
        module.train()
        optimizer = torch.optim.Adam(module.co_submodel.parameters(), lr=0.003)
        loader = data.device_loader(device)
        epochs = steps = 0
        while epochs < 2 or steps < min_steps:
            loader.sampler.set_epoch(epochs)
            for x, y in loader:
                loss = module.training_loss(module(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
            epochs += 1
        (workdir / "copies").mkdir(exist_ok=True)
        torch.save({key: value.detach().clone() for key, value in module.co_submodel.state_dict().items()},
                   workdir / "copies" / f"device_{device:04d}.pt")
    return time.perf_counter() - began


def largest_difference(dcccl_dir: Path, plain_dir: Path, num_devices: int) -> float:
    """The largest weight difference between the two sides' copies of every device."""
    import torch

    from dcccl.artifacts.exports import load_export

    worst = 0.0
    for device in range(num_devices):
        ours = load_export(dcccl_dir / "copies" / f"device_{device:04d}.pt").state_dict
        theirs = torch.load(plain_dir / "copies" / f"device_{device:04d}.pt", weights_only=True)
        worst = max(worst, max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours))
    return worst


def measure(side: str, num_devices: int, min_steps: int, workdir: Path) -> dict[str, float]:
    """Run one side in its own process; its seconds and peak resident memory."""
    workdir.mkdir()
    command = [sys.executable, __file__, "--child", side, "--devices", str(num_devices), "--min-steps",
               str(min_steps), "--workdir", str(workdir)]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} with {num_devices} devices failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_count(count: int, min_steps: int, repeats: int, tmp: Path) -> dict[str, Any]:
    """Both sides at ``count`` devices, ``repeats`` times in alternating turns; per side every repeat's seconds and
    peak memory, and the largest weight difference between the two sides' copies of each repeat."""
    figures: dict[str, dict[str, list[float]]] = {side: {"seconds": [], "peak_rss_mib": []} for side in SIDES}
    difference = 0.0
    for repeat, side in schedule(SIDES, repeats):
        result = measure(side, count, min_steps, tmp / f"{side}_{count}_{repeat}")
        for key in figures[side]:
            figures[side][key].append(result[key])
        print(f"{count:>5} devices, repeat {repeat + 1}: {side:<5} {result['seconds']:7.1f} s, peak RSS "
              f"{result['peak_rss_mib']:.0f} MiB", flush=True)
        if all(len(figures[other]["seconds"]) == repeat + 1 for other in SIDES):  # both sides of this repeat ran
            plain, ours = (tmp / f"{other}_{count}_{repeat}" for other in SIDES)
            difference = max(difference, largest_difference(ours, plain, count))
            shutil.rmtree(plain)
            shutil.rmtree(ours)
    return {"figures": figures, "max_weight_difference": difference}


def main() -> None:
    """Measure every device count on both sides and print the figures, ratios and verdicts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, repeats=3)
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000], help="device counts of a round")
    parser.add_argument("--min-steps", type=int, default=40, help="the local budget's floor in steps")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import logging

        logging.getLogger("dcccl").setLevel(logging.WARNING)
        seconds = (run_dcccl if args.child == "dcccl" else run_plain)(args.workdir, args.devices[0], args.min_steps)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"seconds": seconds, "peak_rss_mib": peak}))
        return
    env = environment()
    print(header(env), flush=True)
    rows, verdicts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.devices:
            measured = measure_count(count, args.min_steps, args.repeats, Path(tmp))
            figures = measured["figures"]
            verdict = Verdict(f"{count:>5} devices, seconds dcccl / plain",
                              Spread.of(ratios(figures["dcccl"]["seconds"], figures["plain"]["seconds"])), 1.3)
            verdicts.append(verdict)
            for side in SIDES:
                print(f"{count:>5} devices, {side:<5}: {Spread.of(figures[side]['seconds']).describe(1, ' s')}; "
                      f"peak RSS median {Spread.of(figures[side]['peak_rss_mib']).median:.0f} MiB")
            print(f"{verdict.line()}; same work: largest weight difference {measured['max_weight_difference']:.2e}",
                  flush=True)
            rows.append({"devices": count, "max_weight_difference": measured["max_weight_difference"],
                         **{f"{side}_{key}": Spread.of(values).as_dict()
                            for side in SIDES for key, values in figures[side].items()}})
    largest, smallest = (row["dcccl_peak_rss_mib"]["values"] for row in (rows[-1], rows[0]))
    memory = Verdict(f"peak RSS of dcccl, {rows[-1]['devices']} / {rows[0]['devices']} devices",
                     Spread.of(ratios(largest, smallest)), 1.5)
    verdicts.append(memory)
    print(memory.line())
    write_json(args.json, env, verdicts, rows=rows, min_steps=args.min_steps, repeats=args.repeats,
               order=list(SIDES))


if __name__ == "__main__":
    main()
