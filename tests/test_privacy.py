"""DP-SGD on the devices: the epsilon a device reports is Opacus' accountant's for the steps it took, over every round
it took part in; a target epsilon holds for the whole run; only the co-submodel is privatised; what DP-SGD cannot
train is refused before anything runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dcccl.artifacts.device_state import load_device_state
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.federated.privacy import DifferentialPrivacy, epsilon_spent, round_step_cap
from dcccl.pipeline.steps import DeviceTask
from lightning_modules import DeviceRoundModule, DeviceSteps
from lightning_modules.training_budget import TrainingBudget
from tests.conftest import require_extra
from tests.test_device_round import BUDGET, FIVE_STEPS, device_module, fleet_data, trainer

require_extra("opacus")
from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402

GROUP_NORM = BackboneSpec("small_cnn", kwargs={"width": 2, "depth": 1, "norm": "group"})


@pytest.fixture
def exports(export_factory: Callable[..., Path]) -> tuple[Path, Path]:
    return export_factory("control_model", seed=2), export_factory("co_submodel", seed=3, spec=GROUP_NORM)


def private_round(root: Path, control: Path, start: Path, privacy: DifferentialPrivacy, round_index: int,
                  devices: tuple[int, ...] = (1, 3), budget: TrainingBudget = BUDGET) -> dict[int, dict]:
    """Train ``devices`` for one round with DP-SGD, each continuing its state of the round before; their records."""
    tasks = [DeviceTask(device, start, root / f"round_{round_index}/device_{device}.pt",
                        state_in=root / f"round_{round_index - 1}/state_{device}.pt" if round_index > 1 else None,
                        state_out=root / f"round_{round_index}/state_{device}.pt") for device in devices]
    module = DeviceRoundModule(device_module(control, start, budget=budget, privacy=privacy), tasks, round_index)
    trainer(root / f"round_{round_index}").fit(module, datamodule=fleet_data())
    report = json.loads((root / f"round_{round_index}/budget.json").read_text())
    return {record["device"]: record for record in report["devices"]}


def test_the_reported_epsilon_is_opacus_accountant_s_for_every_step_taken(tmp_path: Path,
                                                                           exports: tuple[Path, Path]) -> None:
    control, start = exports
    privacy = DifferentialPrivacy(noise_multiplier=1.1, delta=1e-4, max_grad_norm=0.5)
    first = private_round(tmp_path, control, start, privacy, 1)
    second = private_round(tmp_path, control, start, privacy, 2)
    data = fleet_data()
    data.setup("fit")
    for device in (1, 3):
        rate = 1.0 / len(data.device_loader(device))
        accountant = RDPAccountant()
        accountant.history = [(1.1, rate, first[device]["steps"])]
        assert first[device]["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-4), rel=1e-9)
        accountant.history.append((1.1, rate, second[device]["steps"]))
        both = accountant.get_epsilon(1e-4)
        assert second[device]["privacy"]["epsilon"] == pytest.approx(both, rel=1e-9)
        assert second[device]["privacy"]["epsilon"] > first[device]["privacy"]["epsilon"]
        kept = load_device_state(tmp_path / f"round_2/state_{device}.pt")
        # The device's accountant kept both rounds (Opacus merges steps taken at the same noise and rate).
        assert all(sigma == 1.1 and rate_ == pytest.approx(rate) for sigma, rate_, _ in kept["privacy_history"])
        assert sum(steps for *_, steps in kept["privacy_history"]) == first[device]["steps"] + second[device]["steps"]
        assert epsilon_spent(kept["privacy_history"], 1e-4) == pytest.approx(both, rel=1e-9)
        assert second[device]["privacy"]["sample_rate"] == pytest.approx(rate)


@pytest.mark.parametrize("budget", [BUDGET, FIVE_STEPS], ids=["floor", "cap_inside_an_epoch"])
def test_a_target_epsilon_holds_for_every_round_of_the_run(tmp_path: Path, exports: tuple[Path, Path],
                                                           budget: TrainingBudget) -> None:
    control, start = exports
    privacy = DifferentialPrivacy(target_epsilon=3.0, delta=1e-5, rounds=2, accountant="prv")
    private_round(tmp_path, control, start, privacy, 1, budget=budget)
    records = private_round(tmp_path, control, start, privacy, 2, budget=budget)
    for record in records.values():
        spent = record["privacy"]["epsilon"]
        # The noise is the least that keeps two rounds of the steps the device takes within 3 (the noise is sized
        # for the budget's floor, or its cap in steps; the device stops there, mid-epoch if need be).
        assert 2.9 <= spent <= 3.0
        accountant = PRVAccountant()
        accountant.history = [(record["privacy"]["noise_multiplier"], record["privacy"]["sample_rate"],
                               record["steps"])] * 2
        assert spent == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)


def test_only_the_co_submodel_is_privatised_and_the_noise_changes_the_copy(tmp_path: Path,
                                                                          exports: tuple[Path, Path]) -> None:
    control, start = exports
    noisy = DifferentialPrivacy(noise_multiplier=1.0)
    module = device_module(control, start, privacy=noisy)
    task = DeviceTask(2, start, tmp_path / "dp.pt")
    trainer(tmp_path / "dp").fit(DeviceRoundModule(module, [task]), datamodule=fleet_data())
    assert type(module.co_submodel).__name__ == "SmallCNN"  # handed back unwrapped, without Opacus' hooks
    assert all(not parameter.requires_grad for parameter in module.control_model.parameters())
    assert all(getattr(p, "grad_sample", None) is None for p in module.parameters())
    plain = DeviceTask(2, start, tmp_path / "plain.pt")
    trainer(tmp_path / "plain").fit(DeviceRoundModule(device_module(control, start), [plain]), datamodule=fleet_data())
    from dcccl.artifacts.exports import load_export

    dp, reference = load_export(task.export).state_dict, load_export(plain.export).state_dict
    assert any(not torch.allclose(dp[key], reference[key]) for key in dp)


def test_batch_norm_accumulation_and_half_precision_are_refused(export_factory: Callable[..., Path],
                                                                tmp_path: Path, exports: tuple[Path, Path]) -> None:
    control, start = exports
    batch_norm = export_factory("co_submodel", name="bn", spec=BackboneSpec("small_cnn", kwargs={"width": 2}))
    with pytest.raises(ConfigError, match="norm: group"):
        device_module(control, batch_norm, privacy=DifferentialPrivacy(noise_multiplier=1.0))
    module = device_module(control, start, privacy=DifferentialPrivacy(noise_multiplier=1.0))
    task = DeviceTask(1, start, tmp_path / "copy.pt")
    with pytest.raises(ConfigError, match="accumulate_grad_batches"):
        trainer(tmp_path / "acc").fit(DeviceRoundModule(module, [task], steps=DeviceSteps(accumulate_grad_batches=2)),
                                      datamodule=fleet_data())
    with pytest.raises(ConfigError, match="32-bit"):
        trainer(tmp_path / "bf16", precision="bf16-mixed").fit(DeviceRoundModule(module, [task]),
                                                               datamodule=fleet_data())
    assert not task.export.exists()


@pytest.mark.parametrize("settings", [{}, {"target_epsilon": 1.0, "noise_multiplier": 1.0}, {"target_epsilon": 0.0},
                                      {"noise_multiplier": 1.0, "delta": 1.0}, {"noise_multiplier": 1.0, "rounds": 0},
                                      {"noise_multiplier": 1.0, "max_grad_norm": -1.0}])
def test_privacy_settings_that_make_no_sense_are_refused(settings: dict) -> None:
    with pytest.raises(ConfigError, match="privacy"):
        DifferentialPrivacy(**settings)


def test_a_round_s_step_cap_is_its_budget_s_floor_or_its_caps() -> None:
    # No monitor: the first epoch end where both floors hold (40 steps of 17 per epoch: 3 epochs).
    assert round_step_cap(2, 40, False, float("inf"), float("inf"), 17) == 51
    assert round_step_cap(2, 0, False, float("inf"), float("inf"), 17) == 34
    assert round_step_cap(2, 40, False, float("inf"), 45, 17) == 45
    # A monitor may train up to its caps; none at all: no cap, and a target epsilon is refused.
    assert round_step_cap(1, 0, True, 5, float("inf"), 10) == 50
    assert round_step_cap(1, 0, True, float("inf"), float("inf"), 10) is None
    with pytest.raises(ConfigError, match="cap"):
        DifferentialPrivacy(target_epsilon=1.0).noise_for(0.1, None)
    assert BUDGET.monitor is None


def test_a_run_without_opacus_friendly_layers_or_a_finished_run_is_refused(tmp_path: Path) -> None:
    from datamodules.mnist import BundledMNISTDataModule
    from dcccl.commands.audit import audit_main
    from dcccl.pipeline.preflight import check_private_co_submodel
    from tests.test_pipeline import settings

    chosen = settings(tmp_path, privacy=DifferentialPrivacy(target_epsilon=8.0))
    batch_norm = {"model_args": {"co_backbone": {"name": "small_cnn", "checkpoint_path": None, "kwargs": {}}}}

    class Resolved:
        model_args = batch_norm["model_args"]

    class Call:
        stage = "cloud_round"

    data = BundledMNISTDataModule().describe()
    with pytest.raises(ConfigError, match="norm: group"):
        check_private_co_submodel(chosen, [], [(Call(), Resolved())], data)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="run dcccl pipeline first"):
        audit_main(["--run_dir", str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_a_private_pipeline_reports_its_epsilon_and_the_audit_attacks_its_copies(tmp_path: Path) -> None:
    from tests.commands import dcccl

    run_dir = tmp_path / "private"
    # 30 steps per stage at most: the device's cap, and so its noise, comes from the trainer's max_steps.
    result = dcccl("pipeline", "--config", "configs/privacy.yaml", "--run_dir", str(run_dir), "--rounds", "2",
                   "--privacy.target_epsilon", "4", "--trainer.max_steps", "30")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 3.9 <= metrics["privacy/epsilon_max"] <= 4.0 and metrics["privacy/delta"] == 1e-5
    record = json.loads((run_dir / "rounds/round_002/devices/budget.json").read_text())["devices"][0]
    assert record["steps"] == 30
    transfers = json.loads((run_dir / "transfers.json").read_text())["transfers"]
    reported = [t for t in transfers if t["what"] == "epsilon"]
    assert [(t["round"], t["bytes"]) for t in reported] == [(1, 8), (2, 8)]
    assert reported[0]["value"] < reported[1]["value"] == metrics["privacy/epsilon_max"]

    audit = dcccl("audit", "--run_dir", str(run_dir), "--samples", "300")
    assert audit.returncode == 0, audit.stderr[-3000:]
    report = json.loads((run_dir / "membership.json").read_text())
    assert [entry["round"] for entry in report["rounds"]] == [1, 2]
    assert 0.4 < report["auc"] < 0.6 and report["rounds"][-1]["pairs"]["0"] == 300
    assert report["privacy/epsilon_max"] == metrics["privacy/epsilon_max"]
    assert (run_dir / "membership_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "AUC" in audit.stdout
