"""Framework overhead of the cloud stage: Lightning Trainer vs. a plain PyTorch loop doing the same work.

Both sides train the quickstart's cloud submodel (``small_cnn``, width 32, depth 3) with Adam (lr 0.002) on the
bundled-MNIST cloud partition (digits 0-6), batch size 64, shuffled, ``num_workers=0``, for the same number of
epochs, from the same seed:

* **lightning**: :class:`lightning_modules.CloudSubmodelModule` fitted by a :class:`lightning.pytorch.Trainer`
  with :class:`datamodules.BundledMNISTDataModule`; validation, sanity checks, checkpointing, logger, progress
  bar and model summary are off, but the module's per-step ``train/loss`` logging and its torchmetrics train
  accuracy stay on (that is what users run).
* **plain**: the same network, the same ``Subset`` of training samples, an equivalent ``DataLoader``, the same
  optimizer, cross-entropy and the same torchmetrics accuracy update per step (compute + reset per epoch).

So the ratio ``lightning / plain`` measures the overhead of the framework's training loop itself.

One untimed 1-epoch warm-up run on each side comes first; then ``--repeats`` pairs of timed runs of
``--epochs`` epochs each, alternating which side goes first. Each run's figure is its median epoch wall time
(``time.perf_counter``); the figure of merit is the median over repeats of each repeat's ratio lightning / plain.

Run from the repository root: ``python benchmarks/overhead.py [--epochs 3] [--repeats 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from repeat import Spread, Verdict, add_arguments, environment, header, positive_int, ratios, schedule, write_json
from torch import nn

# Importable from a checkout without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

from datamodules import BundledMNISTDataModule  # noqa: E402
from dcccl.backbones.spec import BackboneSpec  # noqa: E402
from lightning_modules import CloudSubmodelModule  # noqa: E402

TARGET_RATIO = 1.15
SEED = 0
BATCH_SIZE = 64
LEARNING_RATE = 0.002
CLOUD_CLASSES = [0, 1, 2, 3, 4, 5, 6]
DEVICE_CLASSES = [7, 8, 9]


@dataclass
class RunTiming:
    """Timing of one training run of ``epochs`` epochs.

    Args:
        side: ``"lightning"`` or ``"plain"``.
        epochs: Epochs trained.
        total_s: Wall time from the start of the run (Trainer / DataLoader / optimizer construction) to its end.
        setup_s: Wall time from the start of the run to the start of the first epoch.
        epoch_s: Wall time of every epoch, from one epoch start to the next; the first epoch also counts the
            setup, the last one the teardown, so they sum to ``total_s``.
        final_loss: Loss of the last training step (sanity check that both sides did the same work).
        final_acc: Train accuracy of the last epoch.
    """

    side: str
    epochs: int
    total_s: float
    setup_s: float
    final_loss: float
    final_acc: float
    epoch_s: list[float]

    @classmethod
    def from_clock(cls, side: str, start: float, epoch_starts: list[float], end: float, final_loss: float,
                   final_acc: float) -> RunTiming:
        """Build from the run's start, every epoch's start and the run's end (``time.perf_counter`` stamps)."""
        bounds = [start, *epoch_starts[1:], end]
        epoch_s = [b - a for a, b in zip(bounds, bounds[1:])]
        return cls(side, len(epoch_starts), end - start, epoch_starts[0] - start, final_loss, final_acc, epoch_s)

    @property
    def per_epoch_s(self) -> float:
        """Mean wall time per epoch of this run (setup and teardown included)."""
        return self.total_s / self.epochs


@dataclass
class Results:
    """What the benchmark reports (also written by ``--json``).

    Args:
        epochs: Timed epochs per run.
        repeats: Timed runs per side.
        lightning_per_epoch_s: Each Lightning run's median epoch time.
        plain_per_epoch_s: Each plain run's median epoch time.
        ratios: Each repeat's ``lightning / plain`` of those (the verdict is taken on their median).
        pooled_ratio: The median of every Lightning epoch over the median of every plain epoch (a cross-check).
        run_ratio: The median over runs of wall time / epochs, Lightning over plain (a cross-check).
        lightning_setup_median_s: Median time from the start of a Lightning run to its first epoch.
        plain_setup_median_s: The same for the plain loop.
        max_param_abs_diff: Largest parameter difference between the two sides' trained networks of any repeat.
        torch_threads: ``torch.get_num_threads()`` on both sides.
        train_samples: Training samples per epoch.
        steps_per_epoch: Optimizer steps per epoch.
        runs: Every timed run.
    """

    epochs: int
    repeats: int
    lightning_per_epoch_s: list[float]
    plain_per_epoch_s: list[float]
    ratios: list[float]
    pooled_ratio: float
    run_ratio: float
    lightning_setup_median_s: float
    plain_setup_median_s: float
    max_param_abs_diff: float
    torch_threads: int
    train_samples: int
    steps_per_epoch: int
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        """The target judged on the median of the per-repeat ratios."""
        return Verdict("ratio lightning / plain (per repeat, of each run's median s/epoch)", Spread.of(self.ratios),
                       TARGET_RATIO)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch identically for both sides (what ``seed_everything`` does, minus logging)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def backbone_spec() -> BackboneSpec:
    """The quickstart's cloud submodel backbone (``configs/stages/cloud.yaml``)."""
    return BackboneSpec("small_cnn", kwargs={"width": 32})


def make_datamodule() -> BundledMNISTDataModule:
    """The quickstart's data (``configs/data/mnist.yaml``), loaded once and shared by every run."""
    datamodule = BundledMNISTDataModule(
        cloud_classes=CLOUD_CLASSES, device_classes=DEVICE_CLASSES, test_fraction=0.2, batch_size=BATCH_SIZE,
        num_workers=0, seed=SEED,
    )
    _ = datamodule.data  # load and split the digits now, outside any timed region
    return datamodule


class EpochStartClock(Callback):
    """Records ``time.perf_counter()`` at the start of every training epoch."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stamp the epoch start."""
        self.starts.append(time.perf_counter())


def run_lightning(datamodule: BundledMNISTDataModule, epochs: int) -> tuple[RunTiming, nn.Module]:
    """Fit the cloud stage module for ``epochs`` epochs; time Trainer construction plus ``fit``."""
    seed_all(SEED)
    module = CloudSubmodelModule(
        num_classes=datamodule.num_classes, in_chans=datamodule.in_chans, backbone=backbone_spec(),
        optimizer=functools.partial(torch.optim.Adam, lr=LEARNING_RATE),
    )
    clock = EpochStartClock()
    seed_all(SEED)  # the same RNG state as the plain side when the first batch is shuffled
    with tempfile.TemporaryDirectory(prefix="dcccl-bench-") as root:
        start = time.perf_counter()
        trainer = Trainer(
            accelerator="cpu", devices=1, max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0,
            enable_checkpointing=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=root, callbacks=[clock],
        )
        trainer.fit(module, datamodule=datamodule)
        end = time.perf_counter()
    if len(clock.starts) != epochs:
        raise RuntimeError(f"Lightning ran {len(clock.starts)} epochs, expected {epochs}")
    metrics = trainer.callback_metrics
    timing = RunTiming.from_clock("lightning", start, clock.starts, end, float(metrics["train/loss"]),
                                  float(metrics["train/acc"]))
    return timing, module.cloud_submodel


def run_plain(datamodule: BundledMNISTDataModule, epochs: int) -> tuple[RunTiming, nn.Module]:
    """Train the same network with a hand-written loop doing the same arithmetic as the cloud stage, over the
    DataModule's own loader of the cloud partition (its sampler shuffles by ``(seed, epoch)``, as under the
    Trainer, which calls its ``set_epoch``)."""
    num_classes, in_chans = datamodule.num_classes, datamodule.in_chans
    seed_all(SEED)
    model = backbone_spec().build(num_classes, in_chans)
    seed_all(SEED)
    start = time.perf_counter()
    loader = datamodule.partition_loader("cloud")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    train_acc = MulticlassAccuracy(num_classes, average="micro")
    model.train()
    epoch_starts: list[float] = []
    last_loss = torch.tensor(float("nan"))
    epoch_acc = torch.tensor(float("nan"))
    for epoch in range(epochs):
        epoch_starts.append(time.perf_counter())
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            train_acc.update(logits, y)  # as the module's self.train_acc.update(...)
            loss.backward()
            optimizer.step()
            last_loss = loss.detach()
        epoch_acc = train_acc.compute()
        train_acc.reset()
    end = time.perf_counter()
    timing = RunTiming.from_clock("plain", start, epoch_starts, end, float(last_loss), float(epoch_acc))
    return timing, model


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference between corresponding parameters and buffers of two networks."""
    diffs = [(ta.float() - tb.float()).abs().max().item() for ta, tb in
             zip(a.state_dict().values(), b.state_dict().values(), strict=True) if ta.numel() > 0]
    return max(diffs) if diffs else 0.0


def quiet_lightning() -> None:
    """Silence Lightning's informational banners and the expected 'few workers' warning."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def benchmark(epochs: int, repeats: int) -> Results:
    """Warm up both sides, then time ``repeats`` alternating pairs of ``epochs``-epoch runs."""
    quiet_lightning()
    datamodule = make_datamodule()
    dataset = datamodule.train_dataset("cloud")
    samples = len(dataset)  # type: ignore[arg-type]
    steps = -(-samples // BATCH_SIZE)

    print(f"warm-up: 1 untimed epoch per side ({samples} samples, {steps} steps/epoch) ...", flush=True)
    run_plain(datamodule, 1)
    run_lightning(datamodule, 1)

    timings: dict[str, list[RunTiming]] = {"plain": [], "lightning": []}
    networks: dict[str, nn.Module] = {}
    diffs: list[float] = []
    for repeat, side in schedule(("plain", "lightning"), repeats):
        if side == "plain":
            timing, networks[side] = run_plain(datamodule, epochs)
        else:
            timing, networks[side] = run_lightning(datamodule, epochs)
        timings[side].append(timing)
        epochs_text = " ".join(f"{s:.3f}" for s in timing.epoch_s)
        print(f"  repeat {repeat + 1}/{repeats} {side:<9} epochs [{epochs_text}] s "
              f"(setup {timing.setup_s:.3f} s, loss {timing.final_loss:.4f}, acc {timing.final_acc:.4f})", flush=True)
        if len(timings["plain"]) == len(timings["lightning"]):  # both sides of this repeat ran
            diffs.append(max_param_diff(networks["lightning"], networks["plain"]))

    def per_run(side: str) -> list[float]:
        return [statistics.median(t.epoch_s) for t in timings[side]]

    def median(side: str, attribute: str) -> float:
        return statistics.median(getattr(t, attribute) for t in timings[side])

    def pooled(side: str) -> float:
        return statistics.median(s for t in timings[side] for s in t.epoch_s)

    return Results(
        epochs=epochs, repeats=repeats,
        lightning_per_epoch_s=per_run("lightning"), plain_per_epoch_s=per_run("plain"),
        ratios=ratios(per_run("lightning"), per_run("plain")),
        pooled_ratio=pooled("lightning") / pooled("plain"),
        run_ratio=median("lightning", "per_epoch_s") / median("plain", "per_epoch_s"),
        lightning_setup_median_s=median("lightning", "setup_s"), plain_setup_median_s=median("plain", "setup_s"),
        max_param_abs_diff=max(diffs), torch_threads=torch.get_num_threads(),
        train_samples=samples, steps_per_epoch=steps,
        runs=[{**asdict(t), "per_epoch_s": t.per_epoch_s} for side in timings for t in timings[side]],
    )


def report(results: Results) -> None:
    """Print the per-repeat figures, their medians and spreads, the cross-checks and the verdict."""
    print()
    print("Cloud stage, training loop only: validation, sanity checks, checkpointing, logger, progress bar and model")
    print("summary are off on the Lightning side; its per-step train/loss logging and torchmetrics train accuracy")
    print("stay on, and the plain loop does the same loss + accuracy arithmetic.")
    print(f"torch threads {results.torch_threads}; {results.epochs} epochs x {results.repeats} repeats per side")
    print()
    print(f"{'repeat':>6} {'plain s/epoch':>14} {'lightning s/epoch':>18} {'ratio':>7}")
    for index, (plain, light, ratio) in enumerate(zip(results.plain_per_epoch_s, results.lightning_per_epoch_s,
                                                      results.ratios), start=1):
        print(f"{index:>6} {plain:>14.3f} {light:>18.3f} {ratio:>7.3f}")
    print("(each run's median epoch; the first epoch counts the run's setup, the last its teardown)")
    print(f"plain:     {Spread.of(results.plain_per_epoch_s).describe(3, ' s/epoch')}")
    print(f"lightning: {Spread.of(results.lightning_per_epoch_s).describe(3, ' s/epoch')}")
    print(f"median setup: plain {results.plain_setup_median_s:.3f} s, "
          f"lightning {results.lightning_setup_median_s:.3f} s")
    print(f"same work check: max |param difference| lightning vs plain after training = "
          f"{results.max_param_abs_diff:.3g}")
    print(f"cross-checks: ratio of the medians over every epoch {results.pooled_ratio:.3f}, "
          f"of the median run wall time / epochs {results.run_ratio:.3f}")
    print(results.verdict.line())


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, repeats=5)
    parser.add_argument("--epochs", type=positive_int, default=3, help="timed epochs per run (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for both sides (default: leave torch's setting)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; exit status 0 whatever the verdict (it is printed, and in the JSON)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment()
    print(header(env), flush=True)
    print(f"torch threads: {torch.get_num_threads()} (same on both sides)", flush=True)
    results = benchmark(args.epochs, args.repeats)
    report(results)
    write_json(args.json, env, [results.verdict], **asdict(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
