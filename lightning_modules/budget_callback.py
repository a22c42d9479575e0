"""The training budget as a Lightning callback: floors, caps, early stopping, the best weights restored, a report."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from dcccl.artifacts.atomic import atomic_torch_save, atomic_write_json
from dcccl.artifacts.run_dir import BUDGET_REPORT
from lightning_modules.training_budget import BudgetState, StoppingRule, TrainingBudget

log = logging.getLogger("dcccl")  # shown on global rank zero only (dcccl.commands.console)

BEST_WEIGHTS = "best_weights.pt"


class BudgetCallback(Callback):
    """Enforces a :class:`TrainingBudget` on a stage's ``fit``.

    After every validation the watched metric is compared with the best so far; the best weights are kept in the
    stage's ``checkpoints/`` folder, so a resumed stage keeps them too. At the end of every epoch the budget decides
    whether to stop; its cap in steps holds after every step (the decisions are :class:`StoppingRule`'s; the trainer
    enforces its own limits). When ``fit`` ends, the best weights are loaded back
    (before the stage exports) and ``budget.json`` in the stage's directory says what ran and why it stopped.

    Args:
        budget: The budget.
        stage: The stage's name, for the report.
    """

    def __init__(self, budget: TrainingBudget, stage: str) -> None:
        self.budget = budget
        self.stage = stage
        self.rule = StoppingRule(budget)
        self.samples = 0

    @property
    def state(self) -> BudgetState:
        """Where the stage stands against its budget."""
        assert self.rule.state is not None  # the rule of a budget has a state
        return self.rule.state

    def _best_path(self, trainer: Trainer) -> Path:
        return Path(trainer.default_root_dir) / "checkpoints" / BEST_WEIGHTS

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count the training samples seen (on every process); stop at the cap in steps, mid-epoch if need be."""
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.samples += int(inputs.shape[0]) * trainer.world_size
        if self.rule.stop_after_step(trainer.global_step):
            trainer.should_stop = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the watched metric; keep the weights when they are the best so far."""
        monitor = self.budget.monitor
        if trainer.sanity_checking or monitor is None or monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[monitor])
        if self.rule.validated(value, trainer.current_epoch, trainer.global_step) and self.budget.restore_best:
            if trainer.is_global_zero:
                atomic_torch_save(pl_module.state_dict(), self._best_path(trainer))
            trainer.strategy.barrier("dcccl-best-weights")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop when the budget says so."""
        if self.rule.stop_after_epoch(trainer.current_epoch + 1, trainer.global_step):
            trainer.should_stop = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Load the best weights back and report what ran (runs before the stage's own export)."""
        best = self._best_path(trainer)
        state = self.state
        restored = self.budget.restore_best and state.best_epoch is not None and best.is_file()
        if restored:
            pl_module.load_state_dict(torch.load(best, map_location=pl_module.device, weights_only=True))
        epochs, steps = trainer.current_epoch, trainer.global_step
        reason = self.rule.reason
        report = {"stage": self.stage, "epochs": epochs, "steps": steps, "samples": self.samples, "stopped": reason,
                  "monitor": self.budget.monitor, "best": state.best, "best_epoch": state.best_epoch,
                  "restored_best": restored, "budget": asdict(self.budget)}
        if trainer.is_global_zero:
            atomic_write_json(Path(trainer.default_root_dir) / BUDGET_REPORT, report)
        kept = (f"; kept the weights of epoch {state.best_epoch + 1} ({self.budget.monitor} {state.best:.4f})"
                if restored and state.best is not None and state.best_epoch is not None else "")
        log.info(f"[dcccl] {self.stage}: trained {epochs} epoch{'s' * (epochs != 1)} ({steps} steps, "
                       f"{self.samples} samples); "
                       f"it {reason}{kept}")

    def state_dict(self) -> dict[str, Any]:
        """What a resumed stage needs to go on deciding as an uninterrupted one would."""
        return {"best": self.state.best, "best_epoch": self.state.best_epoch, "best_step": self.state.best_step,
                "waited": self.state.waited, "samples": self.samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint's state."""
        state = BudgetState(self.budget, state_dict["best"], state_dict["best_epoch"], state_dict["best_step"],
                            state_dict["waited"])
        self.rule = StoppingRule(self.budget, state=state)
        self.samples = state_dict["samples"]
