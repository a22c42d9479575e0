"""How long a stage trains: one rule for every stage of every compared method.

A stage trains at least its floor (epochs and optimizer steps), at most its cap, and in between until the
validation metric it watches has not improved for ``patience`` validations; then the weights of its best validation
are what it exports. A stage that watches nothing (the local training of a round) trains exactly its floor. Floors
in steps make a small data set train as long as a large one's first epoch would; early stopping makes a large one stop
when it has converged instead of after a fixed number of epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from dcccl.errors import ConfigError


@dataclass
class TrainingBudget:
    """A stage's training budget.

    Args:
        monitor: The validation metric to watch (``val/acc``, ``val/agreement``...); ``null`` trains exactly the floor.
        mode: Whether the metric improves upwards (``max``) or downwards (``min``).
        patience: Validations without improvement (by more than ``min_delta``) before the stage stops.
        min_delta: The smallest change that counts as an improvement.
        min_epochs: Floor in epochs.
        min_steps: Floor in optimizer steps (at least this many, however small the data).
        max_epochs: Cap in epochs.
        max_steps: Cap in optimizer steps (``null``: only ``max_epochs``).
        restore_best: Export the weights of the best validation rather than the last ones.
    """

    monitor: Optional[str] = None
    mode: Literal["max", "min"] = "max"
    patience: int = 3
    min_delta: float = 0.0
    min_epochs: int = 1
    min_steps: int = 0
    max_epochs: int = 100
    max_steps: Optional[int] = None
    restore_best: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"budget mode must be 'max' or 'min', got {self.mode!r}")
        if self.patience < 1 or self.min_epochs < 0 or self.min_steps < 0 or self.max_epochs < 1:
            raise ConfigError("budget needs patience >= 1, min_epochs >= 0, min_steps >= 0 and max_epochs >= 1, got "
                              f"{self}")
        if self.max_steps is not None and self.max_steps < self.min_steps:
            raise ConfigError(f"budget max_steps {self.max_steps} is below min_steps {self.min_steps}")


@dataclass
class BudgetState:
    """Where a stage stands against its budget; pure, so that its decisions can be checked by hand.

    Args:
        budget: The budget.
        best: The best validation value so far.
        best_epoch: The epoch (counted from 0) it was reached at.
        best_step: The optimizer step it was reached at.
        waited: Validations since the last improvement.
        reason: Why training stopped (empty while it goes on).
    """

    budget: TrainingBudget
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    best_step: Optional[int] = None
    waited: int = 0
    reason: str = field(default="")

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        delta = value - self.best if self.budget.mode == "max" else self.best - value
        return delta > self.budget.min_delta

    def validated(self, value: float, epoch: int, step: int) -> bool:
        """Record one validation; returns whether it is the best so far."""
        if self.improved(value):
            self.best, self.best_epoch, self.best_step, self.waited = value, epoch, step, 0
            return True
        self.waited += 1
        return False

    def step_cap_reached(self, steps_done: int) -> bool:
        """Whether ``steps_done`` reaches the cap in steps (checked after every step: the cap may fall mid-epoch)."""
        budget = self.budget
        if budget.max_steps is None or steps_done < budget.max_steps:
            return False
        self.reason = f"reached the cap of {budget.max_steps} steps"
        return True

    def should_stop(self, epochs_done: int, steps_done: int) -> bool:
        """Whether to stop after ``epochs_done`` epochs and ``steps_done`` steps (and say why in :attr:`reason`)."""
        budget = self.budget
        if epochs_done >= budget.max_epochs:
            self.reason = f"reached the cap of {budget.max_epochs} epochs"
        elif self.step_cap_reached(steps_done):
            pass
        elif epochs_done < budget.min_epochs or steps_done < budget.min_steps:
            return False
        elif budget.monitor is None:
            self.reason = f"trained its floor ({budget.min_epochs} epoch{'s' * (budget.min_epochs != 1)}, " \
                          f"{budget.min_steps} steps)"
        elif self.best is None:
            self.reason = f"had no {budget.monitor} to watch (no validation samples): trained its floor"
        elif self.waited >= budget.patience:
            self.reason = f"stopped as {budget.monitor} had not improved for {budget.patience} validations"
        else:
            return False
        return True
