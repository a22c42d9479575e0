"""Training throughput of the cloud and device stages on an image folder: dcccl against a plain PyTorch loop.

For each stage and side the script starts its own process (so that each has its own peak memory):

- **cloud**: :class:`lightning_modules.CloudSubmodelModule` with timm ``resnet18`` (cross-entropy);
- **device**: :class:`lightning_modules.DeviceCoTrainingModule` with timm ``mobilenetv3_large_100`` as both control
  model (frozen) and co-submodel (the multi-class hinge);
- **dcccl** fits the stage module with a Lightning ``Trainer``; **plain** runs a ``for`` loop over the same
  DataLoader (the DataModule's own: timm's training pipeline with random-resized crop and flip, the same workers),
  calling the same module's forward and loss, with the same optimizer.

Both sides skip ``--warmup`` steps, then time ``--steps`` steps, ``--repeats`` times each in alternating turns
(plain first, then dcccl first, ...). Figures, each the median of the repeats with its spread: images per second per
side, the per-repeat ratio of dcccl to plain seconds (target: a median of at most 1.10), and each process's peak
resident memory (CPU) or peak CUDA memory.
With a GPU the script measures at 224 px in ``bf16-mixed`` (``torch.autocast`` on the plain side); on a CPU at
``--image-size`` (64-96 px) in 32-bit.

    python benchmarks/throughput.py --json throughput.json
"""

from __future__ import annotations

import argparse
import json
import resource
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

STAGES = ("cloud", "device")
SIDES = ("plain", "dcccl")


def _folders(root: Path, size: int) -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from tests.image_folders import write_class_images

    classes = [f"class_{index:02d}" for index in range(10)]
    write_class_images(root / "cloud", classes[:6], 60, size, seed=1)
    write_class_images(root / "device", classes[6:], 60, size, seed=2)
    write_class_images(root / "test", classes, 2, size, seed=3)
    return {f"{side}_dir": str(root / side) for side in ("cloud", "device", "test")}


def _data(folders: dict[str, str], image_size: int, batch_size: int) -> Any:
    from datamodules import ImageFolderDataModule
    from datamodules.transforms import TrainAugmentation

    return ImageFolderDataModule(**folders, image_size=image_size, batch_size=batch_size, pipeline="timm",
                                 augment=TrainAugmentation(), val_fraction=0.0)


def _module(stage: str, workdir: Path) -> Any:
    import torch

    from dcccl.artifacts.exports import NetworkExport, save_export
    from dcccl.backbones.spec import BackboneSpec
    from lightning_modules import CloudSubmodelModule, DeviceCoTrainingModule

    torch.manual_seed(0)
    if stage == "cloud":
        return CloudSubmodelModule(10, 3, backbone=BackboneSpec("resnet18"))
    spec = BackboneSpec("mobilenetv3_large_100")
    paths = {}
    for role in ("control_model", "co_submodel"):
        paths[role] = workdir / f"{role}.pt"
        save_export(NetworkExport.of(spec.build(10, 3), role, spec, 10, 3), paths[role])  # type: ignore[arg-type]
    return DeviceCoTrainingModule(10, 3, control_model=str(paths["control_model"]),
                                  co_submodel=str(paths["co_submodel"]), margin=1.0)


def run_dcccl(data: Any, module: Any, warmup: int, steps: int, gpu: bool) -> float:
    """Fit ``module`` with a Lightning ``Trainer``; seconds of the ``steps`` steps after ``warmup``."""
    from lightning.pytorch import Callback, Trainer

    class Clock(Callback):
        start = end = 0.0

        def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
            if trainer.global_step == warmup:
                _synchronize(gpu)
                Clock.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            if trainer.global_step == warmup + steps:
                _synchronize(gpu)
                Clock.end = time.perf_counter()

    Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
            max_steps=warmup + steps, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Clock()],
            default_root_dir=str(Path(tempfile.mkdtemp()))).fit(module, datamodule=data)
    return Clock.end - Clock.start


def run_plain(data: Any, module: Any, warmup: int, steps: int, gpu: bool) -> float:
    """The same steps in a plain loop over the DataModule's loader; seconds of the ``steps`` after ``warmup``."""
    import torch

    device = torch.device("cuda" if gpu else "cpu")
    module.to(device).train()
    for network in module.frozen_networks():
        network.eval()
    optimizer = module.configure_optimizers()
    loader = data.partition_loader(module.data_partition)
    done, start, epoch = 0, 0.0, 0
    while done < warmup + steps:
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            if done == warmup:
                _synchronize(gpu)
                start = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = module.training_loss(module(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    _synchronize(gpu)
    return time.perf_counter() - start


def _synchronize(gpu: bool) -> None:
    if gpu:
        import torch

        torch.cuda.synchronize()


def child(stage: str, side: str, workdir: Path, image_size: int, batch_size: int, warmup: int, steps: int) -> None:
    """One side of one stage in this process; prints its figures as one JSON line."""
    import torch

    gpu = torch.cuda.is_available()
    folders = json.loads((workdir / "folders.json").read_text())
    data = _data(folders, 224 if gpu else image_size, batch_size)
    _ = data.data  # index the folders before the clock starts
    module = _module(stage, workdir)
    seconds = (run_dcccl if side == "dcccl" else run_plain)(data, module, warmup, steps, gpu)
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "images_per_s": steps * batch_size / seconds, "peak_mib": peak}))


def measure(stage: str, side: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Run one side of ``stage`` in its own process; its seconds, images per second and peak memory."""
    command = [sys.executable, __file__, "--child", stage, "--side", side, "--workdir", str(workdir),
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{stage}/{side} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_stage(stage: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Both sides of ``stage``, ``args.repeats`` times in alternating turns: per side every repeat's figures."""
    sides: dict[str, dict[str, list[float]]] = {side: {"seconds": [], "images_per_s": [], "peak_mib": []}
                                                for side in SIDES}
    for repeat, side in schedule(SIDES, args.repeats):
        result = measure(stage, side, args, workdir)
        for key in sides[side]:
            sides[side][key].append(result[key])
        print(f"{stage:6s} repeat {repeat + 1}: {side:<5} {result['images_per_s']:7.1f} img/s, peak "
              f"{result['peak_mib']:.0f} MiB", flush=True)
    return sides


def main() -> None:
    """Measure both stages on both sides and print (and optionally write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, repeats=3)
    parser.add_argument("--image-size", type=int, default=64, help="input size on a CPU (a GPU uses 224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.side, args.workdir, args.image_size, args.batch_size, args.warmup, args.steps)
        return
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    env = environment()
    print(header(env) + (f"; GPU {gpu}" if gpu else ""), flush=True)
    figures: dict[str, Any] = {}
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "folders.json").write_text(json.dumps(_folders(workdir / "images", 2 * args.image_size)))
        for stage in STAGES:
            sides = measure_stage(stage, args, workdir)
            verdict = Verdict(f"{stage} seconds dcccl / plain", Spread.of(ratios(sides["dcccl"]["seconds"],
                                                                                  sides["plain"]["seconds"])), 1.10)
            verdicts.append(verdict)
            figures[stage] = {side: {key: Spread.of(values).as_dict() for key, values in sides[side].items()}
                              for side in SIDES}
            for side in SIDES:
                print(f"{stage:6s} {side:<5}: {Spread.of(sides[side]['images_per_s']).describe(1, ' img/s')}; "
                      f"peak median {Spread.of(sides[side]['peak_mib']).median:.0f} MiB")
            print(verdict.line(), flush=True)
    write_json(args.json, env, verdicts, figures=figures, gpu=gpu, image_size=224 if gpu else args.image_size,
               batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, repeats=args.repeats,
               order=list(SIDES))


if __name__ == "__main__":
    main()
