"""Training budgets: the pure decisions checked by hand, and the callback under a real Trainer (floors, early stop,
the best weights exported, the report, a resumed stage deciding as an uninterrupted one)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.mnist import BundledMNISTDataModule
from dcccl.artifacts.exports import load_export
from dcccl.errors import ConfigError
from lightning_modules import CloudSubmodelModule
from lightning_modules.training_budget import (
    TRAINER_LIMITS_REASON,
    BudgetState,
    StoppingRule,
    TrainerLimits,
    TrainingBudget,
)
from tests.conftest import TINY


def test_a_watched_stage_stops_after_patience_validations_without_improvement() -> None:
    state = BudgetState(TrainingBudget(monitor="val/acc", patience=2, min_epochs=1, min_steps=0, max_epochs=10))
    for epoch, value in enumerate([0.5, 0.7, 0.69, 0.7]):  # 0.7 again is no improvement
        state.validated(value, epoch, 10 * (epoch + 1))
        stops = state.should_stop(epoch + 1, 10 * (epoch + 1))
        assert stops == (epoch == 3), epoch
    assert (state.best, state.best_epoch, state.waited) == (0.7, 1, 2)
    assert state.reason == "stopped as val/acc had not improved for 2 validations"


def test_floors_and_caps() -> None:
    floor = BudgetState(TrainingBudget(monitor="val/loss", mode="min", patience=1, min_epochs=3, min_steps=50))
    floor.validated(1.0, 0, 10)
    floor.validated(2.0, 1, 20)  # worse: patience exhausted, but the floor of 3 epochs and 50 steps holds
    assert not floor.should_stop(2, 20)
    assert not floor.should_stop(3, 40)  # 3 epochs, but only 40 steps
    assert floor.should_stop(5, 50) and "had not improved" in floor.reason
    unwatched = BudgetState(TrainingBudget(monitor=None, min_epochs=2, min_steps=30))
    assert not unwatched.should_stop(2, 20) and unwatched.should_stop(3, 30)
    assert unwatched.reason == "trained its floor (2 epochs, 30 steps)"
    capped = BudgetState(TrainingBudget(monitor="val/acc", max_epochs=4, max_steps=100))
    capped.validated(0.1, 0, 1)
    assert capped.should_stop(4, 40) and capped.reason == "reached the cap of 4 epochs"
    assert BudgetState(TrainingBudget(monitor="val/acc", max_steps=60)).should_stop(2, 60)
    assert not BudgetState(TrainingBudget(monitor="val/acc", min_delta=0.1)).improved(float("nan"))


@pytest.mark.parametrize("bad", [{"mode": "up"}, {"patience": 0}, {"min_steps": 10, "max_steps": 5}])
def test_invalid_budgets_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError, match="budget"):
        TrainingBudget(**bad)


def _run(rule: StoppingRule, batches_per_epoch: int) -> tuple[int, int]:
    """The epochs and steps a loop asking ``rule`` takes (one step per batch), as a device of a round loops."""
    epochs = steps = 0
    while rule.may_start_epoch(steps):
        for _ in range(batches_per_epoch):
            steps += 1
            if rule.stop_after_step(steps):
                break
        epochs += 1
        if rule.stop_after_epoch(epochs, steps):
            break
    return epochs, steps


def test_the_trainer_s_limits_read_from_its_fit_loop() -> None:
    assert TrainerLimits.of_trainer(None, None, -1, -1) == TrainerLimits(0, 0, math.inf, math.inf)
    assert TrainerLimits.of_trainer(None, None, None, -1) == TrainerLimits()
    assert TrainerLimits.of_trainer(2, 10, 5, 100) == TrainerLimits(2, 10, 5, 100)


def test_the_budget_s_cap_in_steps_stops_a_loop_mid_epoch() -> None:
    # configs/stages/device_fleet.yaml: exactly five steps, however many batches a device's epoch holds.
    fleet = TrainingBudget(monitor=None, min_epochs=0, min_steps=5, max_steps=5)
    rule = StoppingRule(fleet)
    assert not rule.stop_after_step(4) and rule.stop_after_step(5) and rule.reason == "reached the cap of 5 steps"
    for batches_per_epoch, epochs in ((8, 1), (3, 2), (5, 1), (1, 5)):
        assert _run(StoppingRule(fleet), batches_per_epoch) == (epochs, 5)
    # The noise of DP-SGD is sized for the steps the loop takes.
    assert StoppingRule(fleet).step_cap(8) == 5 and StoppingRule(fleet).step_cap(3) == 5


def test_the_trainer_s_floors_hold_the_budget_s_stop_back_and_its_caps_stop_whatever_the_budget_says() -> None:
    budget = TrainingBudget(monitor=None, min_epochs=2, min_steps=12)
    floors = StoppingRule(budget, TrainerLimits(min_epochs=4))
    assert not floors.stop_after_epoch(2, 20)  # the budget would stop here; the trainer's floor of 4 epochs holds
    assert floors.reason == "trained its floor (2 epochs, 12 steps)"
    assert not floors.stop_after_epoch(3, 30) and floors.stop_after_epoch(4, 40)
    assert _run(StoppingRule(budget, TrainerLimits(min_epochs=4, max_epochs=6)), 10) == (4, 40)
    assert _run(StoppingRule(budget, TrainerLimits(min_steps=25)), 10) == (3, 30)
    capped = StoppingRule(budget, TrainerLimits(max_steps=7))
    assert capped.may_start_epoch(6) and capped.stop_after_step(7) and not capped.may_start_epoch(7)
    assert _run(capped, 5) == (2, 7) and capped.reason == TRAINER_LIMITS_REASON
    epochs = StoppingRule(None, TrainerLimits(max_epochs=3))
    assert _run(epochs, 5) == (3, 15) and epochs.reason == TRAINER_LIMITS_REASON
    assert not epochs.stop_after_step(10**6)  # no budget, no cap in steps


def test_the_effective_limits_and_a_round_s_step_cap_for_dp_sgd() -> None:
    budget = TrainingBudget(monitor=None, min_epochs=2, min_steps=40)
    assert StoppingRule(budget).effective_limits() == TrainerLimits(2, 40, 100, math.inf)
    tighter = StoppingRule(budget, TrainerLimits(min_epochs=3, max_steps=45))
    assert tighter.effective_limits() == TrainerLimits(3, 40, 100, 45)
    # No monitor: the first epoch end where both floors hold (40 steps of 17 per epoch: 3 epochs), within the caps.
    assert StoppingRule(budget).step_cap(17) == 51 and tighter.step_cap(17) == 45
    fleet = TrainingBudget(monitor=None, min_epochs=0, min_steps=5, max_steps=5)
    assert StoppingRule(fleet).step_cap(8) == 5
    # A watched metric may run to the caps; no cap at all: no step cap.
    assert StoppingRule(TrainingBudget(monitor="val/acc", max_epochs=5)).step_cap(10) == 50
    assert StoppingRule(None).step_cap(10) is None
    assert StoppingRule(None, TrainerLimits(max_epochs=2)).step_cap(10) == 20


def _fit(tmp_path: Path, budget: TrainingBudget, **trainer: object) -> tuple[CloudSubmodelModule, Trainer]:
    module = CloudSubmodelModule(10, 1, backbone=TINY, export_path=str(tmp_path / "f.pt"), budget=budget)
    fit = Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                  limit_train_batches=5, limit_val_batches=2, num_sanity_val_steps=0, **trainer)  # type: ignore[arg-type]
    fit.fit(module, datamodule=BundledMNISTDataModule(batch_size=32))
    return module, fit


def test_the_budget_decides_how_long_a_real_stage_trains_and_exports_its_best_weights(tmp_path: Path) -> None:
    # patience 1 on a metric that must go down as training goes on (the learning rate is huge): it stops early,
    # and the export holds the weights of the best epoch, not the last.
    budget = TrainingBudget(monitor="val/acc", patience=1, min_epochs=1, min_steps=0, max_epochs=6)
    module, fit = _fit(tmp_path, budget)
    report = json.loads((tmp_path / "budget.json").read_text())
    assert report["epochs"] == fit.current_epoch <= 6 and report["steps"] == fit.global_step == 5 * report["epochs"]
    assert report["samples"] == 32 * report["steps"]
    best = torch.load(tmp_path / "checkpoints" / "best_weights.pt", weights_only=True)
    exported = load_export(tmp_path / "f.pt").state_dict
    for key, value in exported.items():
        assert torch.equal(value, best[f"cloud_submodel.{key}"]), key
    assert report["restored_best"] and report["best_epoch"] is not None
    floor = _fit(tmp_path / "floor", TrainingBudget(monitor=None, min_epochs=1, min_steps=12))[1]
    assert floor.global_step == 15  # whole epochs of 5 steps until the floor of 12 is reached
    report = json.loads((tmp_path / "floor" / "budget.json").read_text())
    assert report["stopped"] == "trained its floor (1 epoch, 12 steps)"


def test_the_cap_in_steps_stops_a_stage_mid_epoch(tmp_path: Path) -> None:
    # Epochs of 5 steps, a floor of 7 steps and a cap of 7: the stage stops after step 7, inside its second epoch
    # (a check at epoch ends only would run 10).
    _, fit = _fit(tmp_path, TrainingBudget(monitor=None, min_epochs=0, min_steps=7, max_steps=7))
    report = json.loads((tmp_path / "budget.json").read_text())
    assert fit.global_step == report["steps"] == 7 and report["samples"] == 7 * 32
    assert report["stopped"] == "reached the cap of 7 steps"


def test_the_trainers_own_limits_still_apply(tmp_path: Path) -> None:
    _, fit = _fit(tmp_path, TrainingBudget(monitor="val/acc", min_steps=100), max_steps=3)
    assert fit.global_step == 3
    assert "trainer's own limits" in json.loads((tmp_path / "budget.json").read_text())["stopped"]


def test_the_budgets_state_goes_into_checkpoints(tmp_path: Path,
                                                trainer_factory: Callable[..., Trainer]) -> None:
    from lightning_modules.budget_callback import BudgetCallback

    callback = BudgetCallback(TrainingBudget(monitor="val/acc"), "cloud")
    callback.state.validated(0.5, 0, 5)
    callback.state.validated(0.4, 1, 10)
    callback.samples = 320
    resumed = BudgetCallback(TrainingBudget(monitor="val/acc"), "cloud")
    resumed.load_state_dict(callback.state_dict())
    assert (resumed.state.best, resumed.state.best_epoch, resumed.state.waited, resumed.samples) == (0.5, 0, 1, 320)
