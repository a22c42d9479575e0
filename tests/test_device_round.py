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
from datamodules.sampling import device_seed
from dcccl.artifacts.exports import load_export
from dcccl.errors import ConfigError
from dcccl.federated.device_report import finished_reports
from dcccl.pipeline.steps import DeviceTask
from lightning_modules import DeviceCoTrainingModule, DeviceRoundModule, DeviceSteps
from lightning_modules.training_budget import TrainingBudget

FLEET = {"num_devices": 5, "device_partitioner": "dirichlet", "dirichlet_alpha": 0.5, "seed": 3}
BUDGET = TrainingBudget(monitor=None, min_epochs=2, min_steps=12)
# configs/stages/device_fleet.yaml's: exactly five steps, the cap falling inside a device's first epoch.
FIVE_STEPS = TrainingBudget(monitor=None, min_epochs=0, min_steps=5, max_steps=5)


def device_module(control: Path, start: Path, export: Path | None = None, budget: TrainingBudget = BUDGET,
                  **kwargs: object) -> DeviceCoTrainingModule:
    return DeviceCoTrainingModule(10, 1, control_model=str(control), co_submodel=str(start),
                                  export_path=None if export is None else str(export), budget=budget, **kwargs)


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


@pytest.mark.parametrize(("budget", "stopped"), [(BUDGET, "trained its floor (2 epochs, 12 steps)"),
                                                  (FIVE_STEPS, "reached the cap of 5 steps")])
def test_each_copy_equals_the_copy_of_a_device_stage_of_its_own(tmp_path: Path, exports: tuple[Path, Path],
                                                                 budget: TrainingBudget, stopped: str) -> None:
    control, start = exports
    tasks = [DeviceTask(device, start, tmp_path / f"round/device_{device}.pt") for device in (4, 1, 2)]
    round_module = DeviceRoundModule(device_module(control, start, budget=budget, logit_adjustment=0.5,
                                                   report_class_counts=True), tasks)
    trainer(tmp_path / "round").fit(round_module, datamodule=fleet_data())
    report = json.loads((tmp_path / "round/budget.json").read_text())
    assert [record["device"] for record in report["devices"]] == [4, 1, 2]
    for task in tasks:
        alone = tmp_path / f"alone_{task.device}.pt"
        data = fleet_data(device_index=task.device)
        trainer(tmp_path / f"alone_{task.device}").fit(
            device_module(control, start, alone, budget=budget, logit_adjustment=0.5, report_class_counts=True),
            datamodule=data)
        mine, reference = load_export(task.export, "co_submodel"), load_export(alone, "co_submodel")
        assert mine.sample_count == reference.sample_count == len(data.device_dataset(task.device))
        assert mine.class_counts == reference.class_counts == data.device_class_counts(task.device)
        assert mine.state_dict.keys() == reference.state_dict.keys()
        for key in mine.state_dict:  # the same steps on the same batches: the same weights
            torch.testing.assert_close(mine.state_dict[key], reference.state_dict[key], rtol=1e-5, atol=1e-6)
        record = next(r for r in report["devices"] if r["device"] == task.device)
        alone_report = json.loads((tmp_path / f"alone_{task.device}/budget.json").read_text())
        assert (record["epochs"], record["steps"], record["samples"]) == (
            alone_report["epochs"], alone_report["steps"], alone_report["samples"])
        assert record["steps"] >= budget.min_steps and record["epochs"] >= budget.min_epochs
        if budget.max_steps is not None:  # the cap holds mid-epoch, as in a stage's fit
            assert record["steps"] == budget.max_steps and len(data.device_loader(task.device)) > budget.max_steps
    assert report["samples"] == sum(record["samples"] for record in report["devices"])
    # The round's report lists each device's progress record, which reads back as its DeviceReport.
    reports = finished_reports(tmp_path / "round", [4, 1, 2])
    assert [r.to_record() for r in reports] == report["devices"]
    assert all(r.stopped == stopped and r.rank == 0 for r in reports)


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


@pytest.mark.parametrize("options", [
    {"accumulate_grad_batches": 3, "gradient_clip_val": 0.05},
    {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"},
    {"precision": "bf16-true"},
    {"precision": "bf16-mixed", "accumulate_grad_batches": 2},
], ids=["accumulate+clip-norm", "clip-value", "bf16-true", "bf16-mixed+accumulate"])
def test_accumulation_clipping_and_precision_apply_to_each_device_as_to_a_stage_of_its_own(
        tmp_path: Path, exports: tuple[Path, Path], options: dict[str, object]) -> None:
    control, start = exports
    task = DeviceTask(3, start, tmp_path / "round/device_3.pt")
    round_trainer = trainer(tmp_path / "round", **options)
    steps = DeviceSteps.take_from(round_trainer)
    assert (round_trainer.accumulate_grad_batches, round_trainer.gradient_clip_val) == (1, None)  # the round's now
    round_trainer.fit(DeviceRoundModule(device_module(control, start), [task], steps=steps), datamodule=fleet_data())
    alone = tmp_path / "alone.pt"
    trainer(tmp_path / "alone", **options).fit(device_module(control, start, alone),
                                               datamodule=fleet_data(device_index=3))
    plain = tmp_path / "plain.pt"  # the same device without the options: they change the copy
    trainer(tmp_path / "plain").fit(device_module(control, start, plain), datamodule=fleet_data(device_index=3))
    mine, reference = load_export(task.export).state_dict, load_export(alone).state_dict
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(mine[key], value) for key, value in load_export(plain).state_dict.items())
    record = json.loads((tmp_path / "round/budget.json").read_text())["devices"][0]
    budget = json.loads((tmp_path / "alone/budget.json").read_text())
    assert (record["epochs"], record["steps"], record["samples"]) == (budget["epochs"], budget["steps"],
                                                                      budget["samples"])


def test_a_gradient_scaler_scales_each_device_as_a_stage_of_its_own(tmp_path: Path,
                                                                   exports: tuple[Path, Path]) -> None:
    """16-mixed with a scaler (what a GPU gets; on the CPU by hand): each device starts its own scaler."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    control, start = exports

    def fp16() -> dict[str, object]:
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}

    tasks = [DeviceTask(device, start, tmp_path / f"round/device_{device}.pt") for device in (0, 3)]
    trainer(tmp_path / "round", **fp16()).fit(DeviceRoundModule(device_module(control, start), tasks),
                                             datamodule=fleet_data())
    for task in tasks:
        alone = tmp_path / f"alone_{task.device}.pt"
        trainer(tmp_path / f"alone_{task.device}", **fp16()).fit(device_module(control, start, alone),
                                                                 datamodule=fleet_data(device_index=task.device))
        mine, reference = load_export(task.export).state_dict, load_export(alone).state_dict
        for key in reference:
            torch.testing.assert_close(mine[key], reference[key], rtol=1e-4, atol=1e-5)


def test_the_trainer_s_floors_apply_to_each_device_and_the_round_still_ends(tmp_path: Path,
                                                                          exports: tuple[Path, Path]) -> None:
    control, start = exports
    tasks = [DeviceTask(device, start, tmp_path / f"d{device}.pt") for device in range(2)]
    round_module = DeviceRoundModule(device_module(control, start), tasks)
    round_trainer = trainer(tmp_path / "round", min_epochs=4, max_epochs=6)
    round_trainer.fit(round_module, datamodule=fleet_data())
    assert round_trainer.current_epoch == 1  # one pass over the devices, the floor notwithstanding
    records = json.loads((tmp_path / "round/budget.json").read_text())["devices"]
    assert [r["epochs"] for r in records] == [4, 4]  # BUDGET alone stops after 2 epochs


def test_a_batch_limit_that_leaves_a_device_nothing_is_refused(tmp_path: Path, exports: tuple[Path, Path]) -> None:
    control, start = exports
    round_module = DeviceRoundModule(device_module(control, start), [DeviceTask(0, start, tmp_path / "d0.pt")])
    with pytest.raises(ConfigError, match="leaves device 0 no batch to train on"):
        trainer(tmp_path / "round", limit_train_batches=0.0001).fit(round_module, datamodule=fleet_data())
    assert not (tmp_path / "d0.pt").exists()


def test_each_device_and_round_draws_its_own_random_stream() -> None:
    seeds = {device_seed(seed, round_index, device) for seed in range(3) for round_index in range(1, 11)
             for device in range(100)}
    assert len(seeds) == 3 * 10 * 100
    shuffles = {seed * 1_000_003 + epoch for seed in range(3) for epoch in range(1000)}
    assert not seeds & shuffles
    assert device_seed(0, 1, 2) == device_seed(0, 1, 2)
