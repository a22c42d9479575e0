"""How long a stage trains: one rule for every stage of every compared method.

A stage trains at least its floor (epochs and optimizer steps), at most its cap, and in between until the
validation metric it watches has not improved for ``patience`` validations; then the weights of its best validation
are what it exports. A stage that watches nothing (the local training of a round) trains exactly its floor. Floors
in steps make a small data set train as long as a large one's first epoch would; early stopping makes a large one stop
when it has converged instead of after a fixed number of epochs.

:class:`BudgetState` is the budget's own decision; :class:`StoppingRule` is the whole decision of a training loop: the
budget's, within the trainer's own floors and caps (:class:`TrainerLimits`). A stage's ``fit`` asks it through
:class:`~lightning_modules.budget_callback.BudgetCallback` (Lightning enforces the trainer's limits itself there); a
device of a round asks it in :class:`~lightning_modules.device_round.DeviceRoundModule`'s own loop, and DP-SGD sizes
its noise with :meth:`StoppingRule.step_cap`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from dcccl.errors import ConfigError
from dcccl.federated.privacy import round_step_cap

# Why a loop stopped when the budget gave no reason.
TRAINER_LIMITS_REASON = "was stopped by the trainer's own limits (max_epochs, max_steps, ...)"


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


@dataclass(frozen=True)
class TrainerLimits:
    """The trainer's own floors and caps, as a loop that is not Lightning's must obey them.

    Args:
        min_epochs: Floor in epochs.
        min_steps: Floor in optimizer steps.
        max_epochs: Cap in epochs (``inf``: none).
        max_steps: Cap in optimizer steps (``inf``: none).
    """

    min_epochs: int = 0
    min_steps: int = 0
    max_epochs: float = math.inf
    max_steps: float = math.inf

    @classmethod
    def of_trainer(cls, min_epochs: Optional[int], min_steps: Optional[int], max_epochs: Optional[int],
                   max_steps: Optional[int]) -> TrainerLimits:
        """The limits of a trainer's fit loop, which says "none" with ``None`` (floors) or a negative cap."""
        return cls(min_epochs or 0, min_steps or 0,
                   math.inf if max_epochs is None or max_epochs < 0 else max_epochs,
                   math.inf if max_steps is None or max_steps < 0 else max_steps)


@dataclass
class StoppingRule:
    """When a training loop stops: its budget's decision (:class:`BudgetState`) within the trainer's limits.

    The trainer's caps stop the loop whatever the budget says; its floors hold the budget's stop back, as Lightning's
    ``min_epochs``/``min_steps`` hold back a callback's ``should_stop``. A loop asks :meth:`may_start_epoch` before
    each epoch, :meth:`stop_after_step` after each optimizer step and :meth:`stop_after_epoch` after each epoch;
    :attr:`reason` then says why it stopped.

    Args:
        budget: The stage's budget (``None``: only the trainer's limits).
        limits: The trainer's limits (none where the trainer enforces them itself, as Lightning's does in ``fit``).
    """

    budget: Optional[TrainingBudget]
    limits: TrainerLimits = field(default_factory=TrainerLimits)
    state: Optional[BudgetState] = field(default=None)

    def __post_init__(self) -> None:
        if self.state is None and self.budget is not None:
            self.state = BudgetState(self.budget)

    @property
    def reason(self) -> str:
        """Why the loop stopped (the trainer's limits when the budget gave no reason)."""
        return (self.state.reason if self.state is not None else "") or TRAINER_LIMITS_REASON

    def validated(self, value: float, epoch: int, step: int) -> bool:
        """Record one validation of the watched metric; returns whether it is the best so far."""
        return self.state is not None and self.state.validated(value, epoch, step)

    def may_start_epoch(self, steps_done: int) -> bool:
        """Whether another epoch may start after ``steps_done`` steps (the trainer's cap in steps)."""
        return steps_done < self.limits.max_steps

    def stop_after_step(self, steps_done: int) -> bool:
        """Whether to stop right after the step that made ``steps_done``: at the trainer's cap in steps, or at the
        budget's once the trainer's floor in steps holds (a cap may fall mid-epoch, in a stage's ``fit`` as in a
        device's loop)."""
        if steps_done >= self.limits.max_steps:
            return True
        return (self.state is not None and steps_done >= self.limits.min_steps
                and self.state.step_cap_reached(steps_done))

    def stop_after_epoch(self, epochs_done: int, steps_done: int) -> bool:
        """Whether to stop after ``epochs_done`` epochs and ``steps_done`` steps: at the trainer's cap in epochs, or
        when the budget says so and the trainer's floors hold."""
        if epochs_done >= self.limits.max_epochs:
            return True
        return (self.state is not None and self.state.should_stop(epochs_done, steps_done)
                and epochs_done >= self.limits.min_epochs and steps_done >= self.limits.min_steps)

    def effective_limits(self) -> TrainerLimits:
        """The tighter of the budget's and the trainer's floors and caps."""
        limits, budget = self.limits, self.budget
        if budget is None:
            return limits
        return TrainerLimits(max(limits.min_epochs, budget.min_epochs), max(limits.min_steps, budget.min_steps),
                             min(limits.max_epochs, budget.max_epochs),
                             min(limits.max_steps, budget.max_steps if budget.max_steps is not None else math.inf))

    def step_cap(self, batches_per_epoch: int) -> Optional[int]:
        """The most steps a round of ``batches_per_epoch`` batches per epoch is planned to take, for DP-SGD's noise
        (:func:`~dcccl.federated.privacy.round_step_cap`; ``None``: no cap). A budget that watches nothing stops at
        its floor; one that watches a metric, or none at all, may run to the caps."""
        limits = self.effective_limits()
        runs_to_caps = self.budget is None or self.budget.monitor is not None
        return round_step_cap(limits.min_epochs, limits.min_steps, runs_to_caps, limits.max_epochs, limits.max_steps,
                              batches_per_epoch)
