"""A round's devices trained inside one ``fit``: each copy is the one a device stage of its own would have trained, on
that device's samples only; a killed round skips what it finished; padding spreads devices over processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.mnist import BundledMNISTDataModule
from dcccl.run.exports import load_export
from dcccl.run.steps import DeviceTask
from dcccl.run.training_budget import TrainingBudget
from lightning_modules import DeviceCoTrainingModule, DeviceRoundModule

FLEET = {"num_devices": 5, "device_partitioner": "dirichlet", "dirichlet_alpha": 0.5, "seed": 3}
BUDGET = TrainingBudget(monitor=None, min_epochs=2, min_steps=12)


def device_module(control: Path, start: Path, export: Path | None = None, **kwargs: object) -> DeviceCoTrainingModule:
    return DeviceCoTrainingModule(10, 1, control_model=str(control), co_submodel=str(start),
                                  export_path=None if export is None else str(export), budget=BUDGET, **kwargs)


def fleet_data(**kwargs: object) -> BundledMNISTDataModule:
    return BundledMNISTDataModule(batch_size=16, **{**FLEET, **kwargs})  # type: ignore[arg-type]


def trainer(root: Path, **overrides: object) -> Trainer:
    options: dict[str, object] = dict(accelerator="cpu", devices=1, max_epochs=-1, logger=False,
                                      enable_checkpointing=False, enable_progress_bar=False,
                                      enable_model_summary=False, default_root_dir=str(root))
    return Trainer(**{**options, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def exports(export_factory: Callable[..., Path]) -> tuple[Path, Path]:
    return export_factory("control_model", seed=2), export_factory("co_submodel", seed=3)


def test_each_copy_equals_the_copy_of_a_device_stage_of_its_own(tmp_path: Path, exports: tuple[Path, Path]) -> None:
    control, start = exports
    tasks = [DeviceTask(device, start, tmp_path / f"round/device_{device}.pt") for device in (4, 1, 2)]
    round_module = DeviceRoundModule(device_module(control, start, logit_adjustment=0.5, report_class_counts=True),
                                     tasks)
    trainer(tmp_path / "round").fit(round_module, datamodule=fleet_data())
    report = json.loads((tmp_path / "round/budget.json").read_text())
    assert [record["device"] for record in report["devices"]] == [4, 1, 2]
    for task in tasks:
        alone = tmp_path / f"alone_{task.device}.pt"
        data = fleet_data(device_index=task.device)
        trainer(tmp_path / f"alone_{task.device}").fit(
            device_module(control, start, alone, logit_adjustment=0.5, report_class_counts=True), datamodule=data)
        mine, reference = load_export(task.export, "co_submodel"), load_export(alone, "co_submodel")
        assert mine.sample_count == reference.sample_count == len(data.device_dataset(task.device))
        assert mine.class_counts == reference.class_counts == data.device_class_counts(task.device)
        assert mine.state_dict.keys() == reference.state_dict.keys()
        for key in mine.state_dict:  # the same steps on the same batches: the same weights
            torch.testing.assert_close(mine.state_dict[key], reference.state_dict[key], rtol=1e-5, atol=1e-6)
        record = next(r for r in report["devices"] if r["device"] == task.device)
        budget = json.loads((tmp_path / f"alone_{task.device}/budget.json").read_text())
        assert (record["epochs"], record["steps"], record["samples"]) == (
            budget["epochs"], budget["steps"], budget["samples"])
        assert record["steps"] >= BUDGET.min_steps and record["epochs"] >= BUDGET.min_epochs
    assert report["samples"] == sum(record["samples"] for record in report["devices"])


def test_a_device_trains_only_on_its_own_samples(tmp_path: Path, exports: tuple[Path, Path]) -> None:
    control, start = exports
    data = fleet_data()
    seen: dict[int, set[int]] = {}

    class Recording(DeviceCoTrainingModule):
        current = -1

        def begin_device(self, class_counts: list[int]) -> None:
            super().begin_device(class_counts)
            Recording.current = next(d for d in range(5) if data.device_class_counts(d) == class_counts)

        def training_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            seen.setdefault(Recording.current, set()).update(y.tolist())
            return super().training_loss(logits, y)

    module = Recording(10, 1, control_model=str(control), co_submodel=str(start), budget=BUDGET)
    tasks = [DeviceTask(device, start, tmp_path / f"d{device}.pt") for device in range(5)]
    trainer(tmp_path / "round").fit(DeviceRoundModule(module, tasks), datamodule=data)
    for device in range(5):
        held = {c for c, n in enumerate(data.device_class_counts(device)) if n}
        assert seen[device] == held  # every class it holds, none it does not


def test_a_killed_round_skips_the_devices_it_finished(tmp_path: Path, exports: tuple[Path, Path]) -> None:
    control, start = exports
    tasks = [DeviceTask(device, start, tmp_path / f"d{device}.pt") for device in range(4)]
    trainer(tmp_path / "round").fit(DeviceRoundModule(device_module(control, start), tasks), datamodule=fleet_data())
    finished = {task.device: task.export.read_bytes() for task in tasks}
    tasks[2].export.unlink()  # as if killed before device 2's copy was written (its record stays)
    again = DeviceRoundModule(device_module(control, start), tasks)
    trainer(tmp_path / "round").fit(again, datamodule=fleet_data())
    assert again.round_devices == [2]
    assert {task.device: task.export.read_bytes() for task in tasks} == finished


def test_the_trainer_s_limits_cap_each_device_not_the_round(tmp_path: Path, exports: tuple[Path, Path]) -> None:
    control, start = exports
    tasks = [DeviceTask(device, start, tmp_path / f"d{device}.pt") for device in range(5)]
    trainer(tmp_path / "round", limit_train_batches=2, max_epochs=1).fit(
        DeviceRoundModule(device_module(control, start), tasks), datamodule=fleet_data())
    records = json.loads((tmp_path / "round/budget.json").read_text())["devices"]
    assert [(r["epochs"], r["steps"]) for r in records] == [(1, 2)] * 5  # every device, each capped


def test_round_devices_are_padded_to_a_multiple_of_the_processes() -> None:
    data = fleet_data()

    class FakeTrainer:
        world_size = 4
        lightning_module = type("Round", (), {"round_devices": [7, 3, 5, 9, 1]})()

    data.trainer = FakeTrainer()  # type: ignore[assignment]
    assert list(data.train_dataloader()) == [7, 3, 5, 9, 1, -1, -1, -1]
