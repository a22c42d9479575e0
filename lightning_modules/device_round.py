"""A round's devices trained inside one ``fit``: each device's copy of the co-submodel, one after another.

The device stage module (:class:`~lightning_modules.device.DeviceCoTrainingModule` or a subclass, parsed from the
device stage's config as ``dcccl fit`` would) is the template: its guide, its loss, its optimizer and its budget are
what every device trains with. For each device the round module resets the template's co-submodel to the device's
start, trains it on that device's samples only, in a plain loop that takes the steps a device stage of its own would
take (the same batches in the same order, the same budget floors and caps), and writes the copy with its sample count
and its report (:class:`~dcccl.federated.device_report.DeviceReport`). When a device stops is the decision of
:class:`~lightning_modules.training_budget.StoppingRule`, the budget within the trainer's own floors and caps; the
budget's cap in steps is checked at an epoch's end here, so a device finishes the epoch in which it reaches it.
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
from typing import Any, Literal, NamedTuple, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

from datamodules.sampling import device_seed
from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.device_progress import is_finished
from dcccl.artifacts.device_state import load_device_state, save_device_state
from dcccl.artifacts.exports import NetworkExport, load_export, save_export
from dcccl.artifacts.lineage import lineage_of
from dcccl.artifacts.run_dir import BUDGET_REPORT
from dcccl.errors import ConfigError
from dcccl.federated.attacks import Attack, corrupt_weights, flip_labels, inflate_counts
from dcccl.federated.device_report import DeviceReport, PrivacySpent, WireBytes, finished_reports, record_report
from dcccl.federated.privacy import PrivateTraining
from dcccl.pipeline.progress import DEVICES_FIELD
from dcccl.pipeline.steps import DeviceTask
from dcccl.ranks import barrier
from lightning_modules.device import DeviceCoTrainingModule
from lightning_modules.stage_module import NonFiniteLossError
from lightning_modules.training_budget import StoppingRule, TrainerLimits

log = logging.getLogger("dcccl")


class DeviceRoundFailed(RuntimeError):
    """Another process of a distributed device round failed (its own error is in its output)."""


class LoopFigures(NamedTuple):
    """What a device's batch loop did: epochs, optimizer steps, samples seen and its last batch's loss."""

    epochs: int
    steps: int
    samples: int
    last_loss: float


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
        self._limits = TrainerLimits()
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
            # Likewise the trainer's floors and caps: each device obeys them (the round itself is one pass).
            fit_loop = self.trainer.fit_loop
            self._limits = TrainerLimits.of_trainer(fit_loop.min_epochs, fit_loop.epoch_loop.min_steps,
                                                    fit_loop.max_epochs, fit_loop.max_steps)
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

    def train_device(self, device: int) -> DeviceReport:
        """Train ``device``'s copy from its start on its own samples, write it, record it; returns its report."""
        task, datamodule = self.tasks[device], self._device_data()
        kept = load_device_state(task.state_in)
        start, down_bytes = self._received_start(task, kept)
        class_counts = [int(count) for count in datamodule.device_class_counts(device)]
        attack = self._attack_on(device)
        report = self._train_copy(device, start, class_counts, attack, kept)
        export = self._copy_to_send(task, start, class_counts, attack)
        if self.device_module.compression is not None:  # the copy the cloud decodes, and the bytes each way
            export, up_bytes = self._compressed_up(export, start, kept)
            report = replace(report, wire=WireBytes(down_bytes, up_bytes))
        save_export(export, task.export)
        if task.state_out is not None:
            save_device_state(kept, task.state_out)
        report = record_report(self.work_dir, task.export, report)
        self._log_progress(report)
        return report

    def _device_data(self) -> Any:
        """The DataModule, which must serve each device's samples."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "device_loader"):
            raise RuntimeError("a device round needs a dcccl DataModule to serve each device's samples")
        return datamodule

    def _received_start(self, task: DeviceTask, kept: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
        """The co-submodel the device starts from and the bytes it took to come down (0: a plain export). With
        compression it is what the device decodes of the round's co-submodel, given what it holds."""
        start = self._start_state(task.start)
        compression = self.device_module.compression
        if compression is None:
            return start, 0
        start, down_bytes = compression.send_down(start, kept.get("held"))
        kept["held"] = start
        return start, down_bytes

    def _attack_on(self, device: int) -> Optional[Attack]:
        """The run's attack when ``device`` is one of the devices it makes lie."""
        attack, datamodule = self.device_module.attack, self._device_data()
        lies = attack is not None and device in attack.attacked(datamodule.num_devices, datamodule.seed)
        return attack if lies else None

    def _train_copy(self, device: int, start: dict[str, torch.Tensor], class_counts: list[int],
                    attack: Optional[Attack], kept: dict[str, Any]) -> DeviceReport:
        """Train the template's co-submodel from ``start`` on ``device``'s samples until the stopping rule says so
        (through DP-SGD with privacy, its accountant continuing ``kept``'s); returns what the device reports of it."""
        module = self.device_module
        module.co_submodel.load_state_dict(start)
        module.begin_device(class_counts)
        module.train()
        optimizer = module.configure_optimizers()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(module).__name__}.configure_optimizers must return one optimizer to train a device "
                            f"round with, got {type(optimizer).__name__}")
        loader = self._device_data().device_loader(device)
        batches_per_epoch = self._batches_per_epoch(device, len(loader))
        rule = StoppingRule(module.budget, self._limits)
        private = None
        if module.privacy is not None:
            private = self._private_training(kept, optimizer, loader, rule.step_cap(batches_per_epoch))
            module.co_submodel, optimizer, loader = private.network, private.optimizer, private.loader
        try:
            trained = self._batch_loop(device, rule, optimizer, loader, batches_per_epoch, attack)
        finally:
            if private is not None:
                module.co_submodel = private.close()
        report = DeviceReport(device, trained.epochs, trained.steps, trained.samples, rule.reason,
                              last_loss=trained.last_loss, rank=self.global_rank)
        if private is None:
            return report
        spent = private.report()
        kept["privacy_history"] = spent.pop("history")
        return replace(report, privacy=PrivacySpent.from_dict(spent))

    def _batches_per_epoch(self, device: int, batches: int) -> int:
        """How many of the device's ``batches`` per epoch the trainer's batch limit lets it train on."""
        limit = self._batch_limit
        batches_per_epoch = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if batches_per_epoch < 1:
            raise ConfigError(f"limit_train_batches={limit} leaves device {device} no batch to train on (it has "
                              f"{batches} per epoch): give the device stage a limit of at least one batch")
        return batches_per_epoch

    def _batch_loop(self, device: int, rule: StoppingRule, optimizer: torch.optim.Optimizer, loader: Any,
                    batches_per_epoch: int, attack: Optional[Attack]) -> LoopFigures:
        """Epochs over the device's batches until ``rule`` stops them, in the device's own random stream: each
        batch's gradients gathered (:meth:`_backward`), a step every ``accumulate_grad_batches`` batches."""
        precision = self.trainer.precision_plugin
        # A fresh scaler per device (16-mixed on a GPU), as a device stage of its own starts with.
        scaler = torch.amp.GradScaler(self.device.type) if getattr(precision, "scaler", None) is not None else None
        accumulate = self.steps.accumulate_grad_batches
        epochs = steps = samples = 0
        loss = torch.zeros(())
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(device_seed(self._device_data().seed, self.round_index, device))
            optimizer.zero_grad()
            while rule.may_start_epoch(steps):
                if hasattr(loader.sampler, "set_epoch"):  # Poisson sampling (DP-SGD) draws afresh each time
                    loader.sampler.set_epoch(epochs)
                for batch_index, (x, y) in enumerate(loader):
                    if batch_index >= batches_per_epoch:
                        break
                    loss = self._backward(device, x, y, attack, scaler, (epochs, steps))
                    samples += int(x.shape[0])
                    if (batch_index + 1) % accumulate and batch_index + 1 < batches_per_epoch:
                        continue  # Lightning also steps on an epoch's last batches, however few
                    self.steps.step(optimizer, precision, scaler)
                    steps += 1
                    if rule.stop_after_step(steps):
                        break
                epochs += 1
                if rule.stop_after_epoch(epochs, steps):
                    break
        return LoopFigures(epochs, steps, samples, float(loss.detach()))

    def _backward(self, device: int, x: torch.Tensor, y: torch.Tensor, attack: Optional[Attack],
                  scaler: Optional[torch.amp.GradScaler], at: tuple[int, int]) -> torch.Tensor:
        """One batch's loss (in the trainer's precision; labels flipped under a label-flip attack) and its gradients,
        divided for accumulation and scaled by ``scaler``; returns the loss.

        Raises:
            NonFiniteLossError: For a NaN or infinite loss (``at``: the epoch and the step, for the message).
        """
        module, precision = self.device_module, self.trainer.precision_plugin
        x, y = precision.convert_input(x.to(self.device)), y.to(self.device)
        if attack is not None and attack.kind == "label_flip":
            y = flip_labels(y, module.num_classes)
        with precision.train_step_context():
            loss = module.training_loss(module(x), y)
        # Poisson sampling may draw an empty batch: DP-SGD still steps (noise only) on it.
        if x.shape[0] and not bool(torch.isfinite(loss.detach()).all()):
            epochs, steps = at
            raise NonFiniteLossError(
                f"device {device} (in {self.trainer.default_root_dir}): the training loss is "
                f"{loss.detach().float().sum().item()} at step {steps} (epoch {epochs}); the round was stopped and "
                "exported nothing for it: lower the learning rate, or check the data for NaN/inf values")
        scaled = loss / self.steps.accumulate_grad_batches
        (scaled if scaler is None else scaler.scale(scaled)).backward()
        return loss

    def _copy_to_send(self, task: DeviceTask, start: dict[str, torch.Tensor], class_counts: list[int],
                      attack: Optional[Attack]) -> NetworkExport:
        """The trained co-submodel as the export that goes up, with its sample count (and its samples per class when
        the device reports them); what an attacked device sends instead."""
        module = self.device_module
        sample_count, reported_counts = sum(class_counts), class_counts if module.report_class_counts else None
        export = NetworkExport.of(module.co_submodel, "co_submodel", module.co_backbone, module.num_classes,
                                  module.in_chans, sample_count, reported_counts, "device", lineage_of([task.start]))
        if attack is None:
            return export
        parameters = {name for name, _ in module.co_submodel.named_parameters()}
        noise = torch.Generator().manual_seed(device_seed(self._device_data().seed, self.round_index, task.device))
        sample_count, reported_counts = inflate_counts(attack, sample_count, reported_counts)
        return replace(export, state_dict=corrupt_weights(attack, export.state_dict, start, parameters, noise),
                       sample_count=sample_count, class_counts=reported_counts)

    def _compressed_up(self, export: NetworkExport, start: dict[str, torch.Tensor],
                       kept: dict[str, Any]) -> tuple[NetworkExport, int]:
        """The copy as the cloud decodes it from what the device encodes, and the bytes that took (the device keeps
        the residual in ``kept``)."""
        compression = self.device_module.compression
        assert compression is not None
        decoded, kept["residual_up"], up_bytes = compression.send_up(export.state_dict, start, kept.get("residual_up"))
        return replace(export, state_dict=decoded), up_bytes

    def _private_training(self, kept: dict[str, Any], optimizer: torch.optim.Optimizer, loader: Any,
                          step_cap: Optional[int]) -> PrivateTraining:
        """DP-SGD around the template's co-submodel, ``optimizer`` and ``loader``: its accountant continues
        ``kept``'s, its noise is sized for ``step_cap`` steps a round."""
        privacy = self.device_module.privacy
        assert privacy is not None
        if self.steps.accumulate_grad_batches != 1 or self.steps.gradient_clip_val:
            raise ConfigError("privacy (DP-SGD) clips each sample's gradient itself and steps on every batch: remove "
                              "the trainer's accumulate_grad_batches and gradient_clip_val")
        if self.trainer.precision not in ("32-true", "32"):
            raise ConfigError(f"privacy (DP-SGD) trains in 32-bit precision, but the trainer has precision="
                              f"{self.trainer.precision!r}: set trainer.precision: 32-true")
        return PrivateTraining(privacy, kept.get("privacy_history", []), self.device_module.co_submodel, optimizer,
                               loader, step_cap)

    def _log_progress(self, report: DeviceReport) -> None:
        self._trained += 1
        total = len(self.round_devices)
        mine = math.ceil(total / max(self.trainer.world_size, 1))
        every = 1 if mine <= 20 else math.ceil(mine / 10)
        if self._trained % every == 0 or self._trained == mine:
            elapsed = time.perf_counter() - self._started
            where = f" on rank {self.global_rank}" if self.trainer.world_size > 1 else ""
            log.info("[dcccl] device %d trained (%d/%d%s, %.2f s per device): %d epoch%s, %d steps, %d samples; it %s",
                     report.device, self._trained, mine, where, elapsed / self._trained, report.epochs,
                     "s" * (report.epochs != 1), report.steps, report.samples, report.stopped,
                     extra={DEVICES_FIELD: (self._trained, mine)})

    def on_fit_end(self) -> None:
        """Wait for every process; then global rank zero writes the round's budget report (every device's record)."""
        barrier()
        if self.trainer.is_global_zero:
            reports = finished_reports(self.work_dir, list(self.tasks))
            budget = self.device_module.budget
            atomic_write_json(self.work_dir / BUDGET_REPORT, {
                "stage": type(self.device_module).__name__, "samples": sum(report.samples for report in reports),
                "steps": sum(report.steps for report in reports), "devices": [report.to_record() for report in reports],
                "budget": None if budget is None else vars(budget)})
