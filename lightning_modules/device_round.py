"""A round's devices trained inside one ``fit``: each device's copy of the co-submodel, one after another.

The device stage module (:class:`~lightning_modules.device.DeviceCoTrainingModule` or a subclass, parsed from the
device stage's config as ``dcccl fit`` would) is the template: its guide, its loss, its optimizer and its budget are
what every device trains with. For each device the round module resets the template's co-submodel to the device's
start, trains it on that device's samples only, in a plain loop that takes the steps a device stage of its own would
take (the same batches in the same order, the same budget floors and caps), and writes the copy with its sample count.
Parsing the config, building the DataModule and the Trainer happen once per round instead of once per device.

Under DDP the DataModule hands each process different devices; the copies are not parameters of this module, so
DDP synchronises nothing between processes while they train different devices. A device that fails on one process
stops the round on every process (each raises at the end of the round's pass instead of waiting for the others). A
finished device leaves a record in the stage's ``progress/`` folder: a round killed midway skips, when it resumes, the
devices it had finished.

The trainer's precision (its autocast, its gradient scaler for ``16-mixed`` on a GPU, its dtype for ``*-true``), its
gradient clipping and its gradient accumulation apply to each device as they would to a device stage of its own.
Lightning applies clipping and accumulation only to modules it optimizes itself, so the stage runner hands them to
the round (:meth:`DeviceSteps.take_from`) instead of leaving them on the trainer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

from datamodules.sampling import device_seed
from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.device_progress import finished_records, is_finished, record_finished
from dcccl.artifacts.device_state import load_device_state, save_device_state
from dcccl.artifacts.exports import NetworkExport, load_export, save_export
from dcccl.artifacts.lineage import lineage_of
from dcccl.artifacts.run_dir import BUDGET_REPORT
from dcccl.errors import ConfigError
from dcccl.federated.attacks import corrupt_weights, flip_labels, inflate_counts
from dcccl.federated.privacy import PrivateTraining, round_step_cap
from dcccl.pipeline.steps import DeviceTask
from dcccl.ranks import barrier
from lightning_modules.device import DeviceCoTrainingModule
from lightning_modules.stage_module import NonFiniteLossError
from lightning_modules.training_budget import BudgetState

log = logging.getLogger("dcccl")


class DeviceRoundFailed(RuntimeError):
    """Another process of a distributed device round failed (its own error is in its output)."""


@dataclass(frozen=True)
class DeviceSteps:
    """How a device turns batches into optimizer steps: the trainer options Lightning applies only to the modules it
    optimizes itself, as a device stage of its own would get them.

    Args:
        accumulate_grad_batches: Batches whose gradients are summed (each loss divided by this) before a step; an
            epoch's last batches step too.
        gradient_clip_val: Clip the gradients to this norm (or value) before each step (``None``: no clipping).
        gradient_clip_algorithm: ``norm`` or ``value``.
    """

    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"

    @classmethod
    def take_from(cls, trainer: Trainer) -> DeviceSteps:
        """The trainer's accumulation and clipping, removed from the trainer (it refuses them for a module that
        optimizes its networks itself)."""
        steps = cls(int(trainer.accumulate_grad_batches), trainer.gradient_clip_val,  # type: ignore[arg-type]
                    trainer.gradient_clip_algorithm or "norm")  # type: ignore[arg-type]
        trainer.accumulate_grad_batches = 1
        trainer.gradient_clip_val = None
        return steps

    def step(self, optimizer: torch.optim.Optimizer, precision: Precision,
             scaler: Optional[torch.amp.GradScaler]) -> None:
        """One optimizer step on the gradients gathered so far: unscaled, clipped as Lightning's trainer clips, then
        the step (through ``scaler`` when there is one) and the gradients cleared."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        precision.clip_gradients(optimizer, self.gradient_clip_val or 0.0,
                                 GradClipAlgorithmType(self.gradient_clip_algorithm))
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()


class DeviceRoundModule(LightningModule):
    """Trains the devices of ``tasks`` with ``device_module``'s loss, optimizer and budget, one step per device.

    Args:
        device_module: The device stage module (the template every device trains with).
        tasks: The devices to train: each one's start, copy and what crosses the wire.
        round_index: The round (it seeds each device's random stream together with the run's seed and the device).
        steps: Gradient accumulation and clipping for each device (the stage runner takes them from the trainer).
    """

    def __init__(self, device_module: DeviceCoTrainingModule, tasks: Sequence[DeviceTask], round_index: int = 0,
                 steps: Optional[DeviceSteps] = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Kept out of the module's children: DDP must not average the copies that different processes train.
        self._template = [device_module]
        self.tasks = {task.device: task for task in tasks}
        if len(self.tasks) != len(tasks):
            raise ValueError("a device round lists a device twice")
        self.data_partition = device_module.data_partition
        # DDP only wraps a module with a trainable parameter; this one is never used.
        self.anchor = nn.Parameter(torch.zeros(()))
        self.round_index = round_index
        self.steps = steps or DeviceSteps()
        if self.steps.accumulate_grad_batches < 1:
            raise ConfigError(f"accumulate_grad_batches must be at least 1, got {self.steps.accumulate_grad_batches}")
        self.round_devices: list[int] = []
        self._failure: Optional[BaseException] = None
        self._floors = (0, 0)
        self._starts: dict[Path, dict[str, torch.Tensor]] = {}
        self._trained = 0
        self._started = 0.0
        self._batch_limit: int | float = 1.0

    @property
    def device_module(self) -> DeviceCoTrainingModule:
        """The template every device trains with."""
        return self._template[0]

    @property
    def work_dir(self) -> Path:
        """The stage's folder (its budget report and progress records)."""
        return Path(self.trainer.default_root_dir)

    def finished(self, device: int) -> bool:
        """Whether ``device``'s copy was written by this start already (its record names the copy's bytes)."""
        return is_finished(self.work_dir, device, self.tasks[device].export)

    def setup(self, stage: str) -> None:
        """The devices still to train (those a killed start finished are skipped)."""
        if stage == "fit":
            # The trainer's batch limit is each device's (as for a device stage of its own), not the round's.
            self._batch_limit = self.trainer.limit_train_batches
            self.trainer.limit_train_batches = 1.0
            # Likewise the trainer's floors: each device trains at least them (the round itself is one pass).
            fit_loop = self.trainer.fit_loop
            self._floors = (fit_loop.min_epochs or 0, fit_loop.epoch_loop.min_steps or 0)
            fit_loop.min_epochs, fit_loop.epoch_loop.min_steps = None, None
            self.round_devices = [device for device in self.tasks if not self.finished(device)]
            skipped = len(self.tasks) - len(self.round_devices)
            if skipped and self.trainer.is_global_zero:
                log.info("[dcccl] %d of %d devices finished before the round was interrupted; training the other %d",
                         skipped, len(self.tasks), len(self.round_devices))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """A placeholder over the unused parameter: each device gets its own optimizer from the template."""
        return torch.optim.SGD([self.anchor], lr=0.0)

    def on_fit_start(self) -> None:
        """Move the template where this process trains, in the trainer's dtype (``*-true`` precision)."""
        self.trainer.precision_plugin.convert_module(self.device_module)
        self.device_module.to(self.device)
        self._started = time.perf_counter()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Train one device (``-1``: padding, nothing to do).

        Among several processes a failure is kept until the round's pass ends, where every process learns of it
        (a process that raised at once would leave the others waiting for it forever).
        """
        device = int(batch)
        if device < 0 or self._failure is not None:
            return
        if self.trainer.world_size == 1:
            self.train_device(device)
            return
        try:
            self.train_device(device)
        except Exception as err:  # re-raised at the end of the pass, once every process knows
            log.error("[dcccl] device %d failed on rank %d: %s", device, self.global_rank, err)
            self._failure = err

    def on_train_epoch_end(self) -> None:
        """One pass over the round's devices is the whole round; a failure on any process stops every process."""
        self.trainer.should_stop = True
        if self.trainer.world_size > 1:
            failed = self.trainer.strategy.reduce(torch.tensor(float(self._failure is not None), device=self.device),
                                                  reduce_op="sum")
            if self._failure is not None:
                raise self._failure
            if float(failed) > 0:
                raise DeviceRoundFailed(f"the device round failed on {int(float(failed))} other process(es) (their "
                                        f"error is in their output); rank {self.global_rank} stopped with them")

    def _start_state(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._starts:
            self._starts[path] = load_export(path, "co_submodel").state_dict
        return self._starts[path]

    def _caps(self) -> tuple[float, float]:
        """The trainer's own limits (``max_epochs``, ``max_steps``) as a device stage of its own would obey them."""
        epochs = self.trainer.fit_loop.max_epochs
        steps = self.trainer.fit_loop.max_steps
        return (math.inf if epochs is None or epochs < 0 else epochs), (math.inf if steps < 0 else steps)

    def train_device(self, device: int) -> dict[str, Any]:
        """Train ``device``'s copy from its start on its own samples, write it, record it; returns the record."""
        task = self.tasks[device]
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "device_loader"):
            raise RuntimeError("a device round needs a dcccl DataModule to serve each device's samples")
        module = self.device_module
        kept = load_device_state(task.state_in)
        start = self._start_state(task.start)
        compression = module.compression
        down_bytes = 0
        if compression is not None:  # what the device decodes of the round's co-submodel, given what it holds
            start, down_bytes = compression.send_down(start, kept.get("held"))
            kept["held"] = start
        module.co_submodel.load_state_dict(start)
        class_counts = [int(count) for count in datamodule.device_class_counts(device)]
        attack = module.attack if module.attack is not None and \
            device in module.attack.attacked(datamodule.num_devices, datamodule.seed) else None
        module.begin_device(class_counts)
        module.train()
        optimizer = module.configure_optimizers()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(module).__name__}.configure_optimizers must return one optimizer to train a device "
                            f"round with, got {type(optimizer).__name__}")
        loader = datamodule.device_loader(device)
        limit = self._batch_limit
        batches_per_epoch = min(len(loader), limit) if isinstance(limit, int) else int(len(loader) * limit)
        if batches_per_epoch < 1:
            raise ConfigError(f"limit_train_batches={limit} leaves device {device} no batch to train on (it has "
                              f"{len(loader)} per epoch): give the device stage a limit of at least one batch")
        budget = module.budget
        state = BudgetState(budget) if budget is not None else None
        max_epochs, max_steps = self._caps()
        min_epochs, min_steps = self._floors
        private = None
        if module.privacy is not None:
            private = self._private_training(module, kept, optimizer, loader, batches_per_epoch)
            module.co_submodel, optimizer, loader = private.network, private.optimizer, private.loader
        accumulate = self.steps.accumulate_grad_batches
        precision = self.trainer.precision_plugin
        # A fresh scaler per device (16-mixed on a GPU), as a device stage of its own starts with.
        scaler = torch.amp.GradScaler(self.device.type) if getattr(precision, "scaler", None) is not None else None
        epochs = steps = samples = 0
        loss = torch.zeros(())
        rng_devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(device_seed(datamodule.seed, self.round_index, device))
                optimizer.zero_grad()
                while steps < max_steps:
                    if hasattr(loader.sampler, "set_epoch"):  # Poisson sampling (DP-SGD) draws afresh each time
                        loader.sampler.set_epoch(epochs)
                    for batch_index, (x, y) in enumerate(loader):
                        if batch_index >= batches_per_epoch:
                            break
                        x, y = precision.convert_input(x.to(self.device)), y.to(self.device)
                        if attack is not None and attack.kind == "label_flip":
                            y = flip_labels(y, module.num_classes)
                        with precision.train_step_context():
                            loss = module.training_loss(module(x), y)
                        # Poisson sampling may draw an empty batch: DP-SGD still steps (noise only) on it.
                        if x.shape[0] and not bool(torch.isfinite(loss.detach()).all()):
                            raise NonFiniteLossError(
                                f"device {device} (in {self.trainer.default_root_dir}): the training loss is "
                                f"{loss.detach().float().sum().item()} at step {steps} (epoch {epochs}); the round "
                                "was stopped and exported nothing for it: lower the learning rate, or check the data "
                                "for NaN/inf values")
                        scaled = loss / accumulate
                        (scaled if scaler is None else scaler.scale(scaled)).backward()
                        samples += int(x.shape[0])
                        if (batch_index + 1) % accumulate and batch_index + 1 < batches_per_epoch:
                            continue  # Lightning also steps on an epoch's last batches, however few
                        self.steps.step(optimizer, precision, scaler)
                        steps += 1
                        if steps >= max_steps:
                            break
                    epochs += 1
                    if epochs >= max_epochs:
                        break
                    if state is not None and state.should_stop(epochs, steps) and epochs >= min_epochs \
                            and steps >= min_steps:
                        break
        finally:
            if private is not None:
                module.co_submodel = private.close()
        reason = (state.reason if state is not None else "") or \
            "was stopped by the trainer's own limits (max_epochs, max_steps, ...)"
        sample_count, reported_counts = sum(class_counts), class_counts if module.report_class_counts else None
        export = NetworkExport.of(module.co_submodel, "co_submodel", module.co_backbone, module.num_classes,
                                  module.in_chans, sample_count, reported_counts, "device", lineage_of([task.start]))
        if attack is not None:  # what a lying device sends instead
            parameters = {name for name, _ in module.co_submodel.named_parameters()}
            noise = torch.Generator().manual_seed(device_seed(datamodule.seed, self.round_index, device))
            sample_count, reported_counts = inflate_counts(attack, sample_count, reported_counts)
            export = replace(export, state_dict=corrupt_weights(attack, export.state_dict, start, parameters, noise),
                             sample_count=sample_count, class_counts=reported_counts)
        details: dict[str, Any] = {"epochs": epochs, "steps": steps, "samples": samples,
                                   "last_loss": float(loss.detach()), "stopped": reason, "rank": self.global_rank}
        if private is not None:
            report = private.report()
            kept["privacy_history"] = report.pop("history")
            details["privacy"] = report
        if compression is not None:  # the copy the cloud decodes, and the bytes each way
            trained = export.state_dict
            decoded, kept["residual_up"], up_bytes = compression.send_up(trained, start, kept.get("residual_up"))
            export = replace(export, state_dict=decoded)
            details["wire"] = {"down_bytes": down_bytes, "up_bytes": up_bytes}
        save_export(export, task.export)
        if task.state_out is not None:
            save_device_state(kept, task.state_out)
        record = record_finished(self.work_dir, device, task.export, details)
        self._report(device, record)
        return record

    def _private_training(self, module: DeviceCoTrainingModule, kept: dict[str, Any], optimizer: torch.optim.Optimizer,
                          loader: Any, batches_per_epoch: int) -> PrivateTraining:
        """DP-SGD around this device's co-submodel, optimizer and loader, its accountant continuing ``kept``'s."""
        privacy = module.privacy
        assert privacy is not None
        if self.steps.accumulate_grad_batches != 1 or self.steps.gradient_clip_val:
            raise ConfigError("privacy (DP-SGD) clips each sample's gradient itself and steps on every batch: remove "
                              "the trainer's accumulate_grad_batches and gradient_clip_val")
        if self.trainer.precision not in ("32-true", "32"):
            raise ConfigError(f"privacy (DP-SGD) trains in 32-bit precision, but the trainer has precision="
                              f"{self.trainer.precision!r}: set trainer.precision: 32-true")
        budget = module.budget
        max_epochs, max_steps = self._caps()
        min_epochs, min_steps = self._floors
        if budget is not None:
            max_epochs = min(max_epochs, budget.max_epochs)
            max_steps = min(max_steps, budget.max_steps if budget.max_steps is not None else math.inf)
            min_epochs, min_steps = max(min_epochs, budget.min_epochs), max(min_steps, budget.min_steps)
        cap = round_step_cap(min_epochs, min_steps, budget is None or budget.monitor is not None, max_epochs,
                             max_steps, batches_per_epoch)
        return PrivateTraining(privacy, kept.get("privacy_history", []), module.co_submodel, optimizer, loader, cap)

    def _report(self, device: int, record: dict[str, Any]) -> None:
        self._trained += 1
        total = len(self.round_devices)
        mine = math.ceil(total / max(self.trainer.world_size, 1))
        every = 1 if mine <= 20 else math.ceil(mine / 10)
        if self._trained % every == 0 or self._trained == mine:
            elapsed = time.perf_counter() - self._started
            where = f" on rank {self.global_rank}" if self.trainer.world_size > 1 else ""
            log.info("[dcccl] device %d trained (%d/%d%s, %.2f s per device): %d epochs, %d steps, %d samples; it %s",
                     device, self._trained, mine, where, elapsed / self._trained, record["epochs"], record["steps"],
                     record["samples"], record["stopped"])

    def on_fit_end(self) -> None:
        """Wait for every process; then global rank zero writes the round's budget report (every device's record)."""
        barrier()
        if self.trainer.is_global_zero:
            records = finished_records(self.work_dir, list(self.tasks))
            budget = self.device_module.budget
            atomic_write_json(self.work_dir / BUDGET_REPORT, {
                "stage": type(self.device_module).__name__, "samples": sum(record["samples"] for record in records),
                "steps": sum(record["steps"] for record in records), "devices": records,
                "budget": None if budget is None else vars(budget)})
