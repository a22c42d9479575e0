"""A fleet of devices: sampling and availability, latest-update averaging, the ledger, the budget gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.mnist import BundledMNISTDataModule
from dcccl.artifacts.exports import load_export, load_network, save_export
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.aggregation import FedAvg, LatestUpdate
from dcccl.federated.costs import state_dict_bytes
from dcccl.federated.device_limits import DeviceBudget, DeviceBudgetExceeded, check_device_budget
from dcccl.federated.fleet import FleetSpec
from dcccl.federated.ledger import Ledger, LedgerViolation
from dcccl.pipeline.boundary import BoundaryViolation, DeviceGate
from dcccl.pipeline.fusion import FusionStep, fuse_exports
from dcccl.pipeline.plan import dcccl_plan
from dcccl.pipeline.steps import StageCall
from tests.commands import dcccl
from tests.conftest import write_fake_export
from tests.test_comparison import FakeRunner
from tests.test_pipeline import execute, settings


def schedule(tmp_path: Path, rounds: dict[int, list[int]]) -> Path:
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({str(r): devices for r, devices in rounds.items()}))
    return path


def test_sampling_is_seeded_per_round_and_sized_by_the_fraction() -> None:
    fleet = FleetSpec(num_devices=20, sample_fraction=0.3)
    first = fleet.sampled(seed=0, round_index=1)
    assert len(first) == math.ceil(0.3 * 20) == len(set(first))
    assert first == fleet.sampled(seed=0, round_index=1)  # a resumed run makes the same choice
    assert first != fleet.sampled(seed=0, round_index=2) or first != fleet.sampled(seed=1, round_index=1)
    assert FleetSpec(num_devices=20, sample_fraction=0.01).sampled(0, 1).__len__() == 1  # at least one
    assert FleetSpec(num_devices=5, availability=0.0).reporting(0, 1) == []
    assert FleetSpec(num_devices=5, availability=1.0).reporting(0, 1) == [0, 1, 2, 3, 4]
    online = [len(FleetSpec(num_devices=1000, availability=0.7).online(s, 1)) for s in range(3)]
    assert all(650 < n < 750 for n in online)


def test_fedavg_fuses_reporting_devices_and_latest_update_keeps_offline_ones(tmp_path: Path) -> None:
    plan = schedule(tmp_path, {1: [0, 1, 2], 2: [1], 3: [2, 3]})
    fleet = FleetSpec(num_devices=4, availability_schedule=plan)
    assert fleet.reporting(0, 1) == [0, 1, 2] and fleet.reporting(0, 2) == [1]
    assert FedAvg().fused_copies(fleet, 0, 2) == [(1, 2)]
    # Round 2: device 1 reported now; 0 and 2 are offline but their round-1 copies keep their weight.
    assert LatestUpdate().fused_copies(fleet, 0, 2) == [(0, 1), (1, 2), (2, 1)]
    assert LatestUpdate().fused_copies(fleet, 0, 3) == [(0, 1), (1, 2), (2, 3), (3, 3)]
    with pytest.raises(ValueError, match="unknown devices"):
        FleetSpec(num_devices=2, availability_schedule=plan)


def test_pipeline_trains_reporting_devices_on_their_own_data_and_fuses_latest_copies(tmp_path: Path) -> None:
    fleet = FleetSpec(num_devices=4, partitioner="dirichlet", availability_schedule=schedule(
        tmp_path, {1: [0, 1, 2, 3], 2: [3]}))
    runner = FakeRunner()
    fleet_settings = settings(tmp_path, rounds=2, fleet=fleet, aggregation=LatestUpdate())
    metrics = execute(fleet_settings, runner)
    devices = [c for c in runner.calls if c.stage == "device"]
    # One device stage per round trains that round's reporting devices, each into its own copy.
    assert [(c.round_index, [t.device for t in c.devices]) for c in devices] == [(1, [0, 1, 2, 3]), (2, [3])]
    assert all(c.outputs == tuple(t.export for t in c.devices) for c in devices)
    assert all(c.data_args["num_devices"] == 4 and c.data_args["device_partitioner"] == "dirichlet"
               for c in runner.calls)
    fusion_2 = [step for step in dcccl_plan(fleet_settings) if isinstance(step, FusionStep)][1]
    assert [Path(p).parts[-3:-1] for p in fusion_2.device_copies] == [
        ("round_001", "device_000"), ("round_001", "device_001"), ("round_001", "device_002"),
        ("round_002", "device_003")]
    state = json.loads((tmp_path / "run/rounds/round_002/fleet.json").read_text())
    assert state["reported"] == [3] and len(state["fused_copies"]) == 4
    assert metrics["transfers/uplink_bytes"] > 0


def test_ledger_totals_equal_the_state_dicts_actually_transferred(tmp_path: Path) -> None:
    runner = FakeRunner()
    fleet = FleetSpec(num_devices=3, availability_schedule=schedule(tmp_path, {1: [0, 1], 2: [1, 2]}))
    fleet_settings = settings(tmp_path, rounds=2, fleet=fleet)
    metrics = execute(fleet_settings, runner)
    run = fleet_settings.run
    size = {path: state_dict_bytes(load_export(path).state_dict) for path in run.root.rglob("*.pt")}
    g, h = size[run.control_model], size[run.initial_co_submodel]
    # Down: g once to each of the 3 devices that ever trained; h to every device in every round it trained.
    # Up: each trained copy plus its 8-byte sample count. Devices trained: round 1: 0, 1; round 2: 1, 2.
    expected_down = 3 * g + 4 * h
    expected_up = sum(size[run.device_copy(r, d)] + 8 for r, d in [(1, 0), (1, 1), (2, 1), (2, 2)])
    assert metrics["transfers/downlink_bytes"] == expected_down
    assert metrics["transfers/uplink_bytes"] == expected_up
    ledger = json.loads(run.transfers.read_text())
    assert {t["what"] for t in ledger["transfers"] if t["direction"] == "down"} == {"control_model", "co_submodel"}
    assert {t["what"] for t in ledger["transfers"] if t["direction"] == "up"} == {"co_submodel", "sample_count"}
    assert ledger["totals"]["per_round"]["1"]["downlink_bytes"] == 2 * g + 2 * h
    assert forbidden_crossings(run) == []


def forbidden_crossings(run: RunDirectory) -> list[tuple[int, int, str, str, str]]:
    """``(round, device, direction, what, why)`` of every transfer in the run's ledger whose file carries a tensor of
    the cloud submodel (same shape and values; constant tensors aside, every network has them) or a batch of raw
    samples, whatever role the file records."""
    cloud = [t for t in load_export(run.cloud_submodel).state_dict.values() if t.unique().numel() > 1]
    found = []
    for transfer in json.loads(run.transfers.read_text())["transfers"]:
        tensors = list(load_export(transfer["file"]).state_dict.values()) if transfer["file"] else []
        where = (transfer["round"], transfer["device"], transfer["direction"], transfer["what"])
        if any(c.shape == t.shape and torch.equal(c, t) for t in tensors for c in cloud):
            found.append((*where, "cloud submodel tensor"))
        if any(t.shape[-3:] == (1, 28, 28) for t in tensors):
            found.append((*where, "raw samples"))
    return found


class LeakingRunner(FakeRunner):
    """A fake runner whose ``leak`` stage writes its copies from the cloud submodel's weights under the co-submodel's
    role (``cloud_round``: sent down; ``device``: sent up), or (``samples``) whose device copies carry a batch of
    images beside their weights."""

    def __init__(self, leak: str, cloud_submodel: Path) -> None:
        super().__init__()
        self.leak = leak
        self.cloud_submodel = cloud_submodel

    def __call__(self, call: StageCall, resume: bool = False) -> None:
        super().__call__(call, resume)
        if call.stage != ("device" if self.leak == "samples" else self.leak):
            return
        for output in (task.export for task in call.devices) if call.stage == "device" else call.outputs[:1]:
            export = load_export(output)
            if self.leak == "samples":
                export.state_dict["images"] = torch.rand(4, 1, 28, 28)
            else:
                export.state_dict = load_export(self.cloud_submodel).state_dict
            save_export(export, output)


@pytest.mark.parametrize(("leak", "caught"), [("cloud_round", ("down", "co_submodel", "cloud submodel tensor")),
                                               ("device", ("up", "co_submodel", "cloud submodel tensor")),
                                               ("samples", ("up", "co_submodel", "raw samples"))])
def test_the_ledger_audit_catches_what_a_leaking_stage_sends_under_an_allowed_role(
        tmp_path: Path, leak: str, caught: tuple[str, str, str]) -> None:
    fleet = FleetSpec(num_devices=3, availability_schedule=schedule(tmp_path, {1: [0, 1], 2: [1, 2]}))
    fleet_settings = settings(tmp_path, rounds=2, fleet=fleet)
    run = fleet_settings.run
    runner = LeakingRunner(leak, run.cloud_submodel)
    execute(fleet_settings, runner)  # no data description: no device gate, the leak reaches the ledger
    # Every transfer of the leaking kind is caught, for its reason, and nothing else (the control model is clean).
    assert forbidden_crossings(run) == [(r, d, *caught) for r, d in [(1, 0), (1, 1), (2, 1), (2, 2)]]
    # The device gate, which runs before each device stage in a real run, refuses the downlink leak on content alone.
    gate = DeviceGate(cloud_submodel=run.cloud_submodel)
    device_calls = [call for call in runner.calls if call.stage == "device"]
    if leak == "cloud_round":
        with pytest.raises(BoundaryViolation, match="of its tensors are the cloud submodel's"):
            gate(device_calls[0])
    else:
        for call in device_calls:
            gate(call)


def test_the_device_gate_refuses_a_device_stage_that_would_receive_the_cloud_submodel(tmp_path: Path) -> None:
    cloud = tmp_path / "cloud_submodel.pt"
    write_fake_export(cloud)
    plan = dcccl_plan(settings(tmp_path, rounds=1))
    device = next(step for step in plan if isinstance(step, StageCall) and step.stage == "device")
    tampered = StageCall(**{**vars(device), "inputs": (cloud,)})
    with pytest.raises(LedgerViolation, match="refusing to send a cloud_submodel down"):
        DeviceGate()(tampered)
    with pytest.raises(LedgerViolation, match="refusing to send a cloud_submodel down"):
        Ledger().record_file(1, 0, "down", cloud)
    with pytest.raises(LedgerViolation, match="refusing to send a cloud_submodel up"):
        Ledger().record_file(1, 0, "up", cloud)


def test_device_budget_gate_states_figure_and_limit(tmp_path: Path) -> None:
    from dcccl.backbones import BackboneSpec

    co = BackboneSpec("small_cnn", kwargs={"width": 8}).build(10, 1)
    control = BackboneSpec("small_cnn", kwargs={"width": 8}).build(10, 1)
    measured = check_device_budget(DeviceBudget(max_params=20_000), co, control, (1, 28, 28), 10)
    assert measured["params"] == 2 * 6274
    with pytest.raises(DeviceBudgetExceeded, match=r"params 12,548 > limit 10,000"):
        check_device_budget(DeviceBudget(max_params=10_000), co, control, (1, 28, 28), 10)
    with pytest.raises(DeviceBudgetExceeded, match="peak train memory bytes .* > limit 1,000"):
        check_device_budget(DeviceBudget(max_peak_train_memory_bytes=1000, batch_size=4), co, None, (1, 28, 28), 10)
    # In the pipeline the gate runs before the first device trains, and refuses the run.
    from dcccl.pipeline.execution import PlanRun
    from dcccl.pipeline.preflight import DataDescription

    budget_settings = settings(tmp_path, rounds=1, device_budget=DeviceBudget(max_params=10))
    runner = FakeRunner()
    data = DataDescription(10, 1, (1, 28, 28), np.zeros(3, dtype=np.int64), [np.arange(3)])
    with pytest.raises(DeviceBudgetExceeded):
        PlanRun(budget_settings, dcccl_plan(budget_settings), runner).execute(data)
    assert "device" not in [c.stage for c in runner.calls]


def test_each_device_gets_its_own_share_of_the_device_samples() -> None:
    shares = [BundledMNISTDataModule(num_devices=5, device_index=k, device_partitioner="dirichlet", seed=1)
              for k in range(5)]
    sizes = [len(dm.train_dataset("device")) for dm in shares]
    assert sum(sizes) == 1080 and all(size > 0 for size in sizes)  # 3 digits x 360 (40 each held out)
    first = shares[0]
    positions = [set(part.tolist()) for part in first.device_parts]
    assert set().union(*positions) == set(range(1080)) and sum(map(len, positions)) == 1080
    with pytest.raises(ValueError, match="not one of the 5 devices"):
        BundledMNISTDataModule(num_devices=5, device_index=5)


def _fusion(tmp_path: Path, cloud: Path, copies: tuple[Path, ...], bases: tuple = (),
            onto: Path | None = None) -> FusionStep:
    return FusionStep(label="fusion", restart_point="rounds", outputs=(tmp_path / "fused.pt",), inputs=(),
                      round_index=1, rule=FedAvg(), cloud_copy=cloud, device_copies=copies,
                      device_bases=bases or (None,) * len(copies), rebase_onto=onto)


def test_fusion_of_a_round_where_no_device_reported_is_the_cloud_copy(tmp_path: Path) -> None:
    cloud = tmp_path / "co_submodel.pt"
    write_fake_export(cloud, sample_count=100)
    fused, _ = fuse_exports(_fusion(tmp_path, cloud, ()))
    assert fused.sample_count == 100
    for key, value in load_network(cloud, "co_submodel").state_dict().items():
        assert torch.equal(fused.state_dict[key], value)


@pytest.mark.slow
def test_small_fleet_through_the_cli(tmp_path: Path) -> None:
    result = dcccl("pipeline", "--config", "configs/fleet.yaml", "--run_dir", str(tmp_path), "--rounds", "2",
                   "--fleet.num_devices", "4", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                   "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    partition = json.loads((tmp_path / "fleet/partition.json").read_text())
    assert partition["num_devices"] == 4 and sum(d["samples"] for d in partition["devices"]) == 1080
    assert (tmp_path / "fleet/partition.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ledger = json.loads((tmp_path / "transfers.json").read_text())
    assert metrics["transfers/uplink_bytes"] == ledger["totals"]["uplink_bytes"] > 0
    assert "device/cloud transfers" in result.stdout


def test_stale_copies_contribute_their_update_rebased_on_the_current_model(tmp_path: Path) -> None:
    from dcccl.federated.aggregation.averaging import rebase_update

    copy = {"w": torch.tensor([3.0, 5.0]), "var": torch.tensor([0.5]), "n": torch.tensor(7)}
    base = {"w": torch.tensor([1.0, 1.0]), "var": torch.tensor([2.0]), "n": torch.tensor(2)}
    onto = {"w": torch.tensor([10.0, 20.0]), "var": torch.tensor([1.0]), "n": torch.tensor(9)}
    rebased = rebase_update(copy, base, onto, parameters={"w"})
    assert torch.equal(rebased["w"], torch.tensor([12.0, 24.0]))  # 10 + (3 - 1), 20 + (5 - 1)
    # Buffers keep the copy's own values: 1 + (0.5 - 2) would be a negative variance.
    assert torch.equal(rebased["var"], torch.tensor([0.5])) and rebased["n"] == 7
    # In the pipeline: round 2's fusion rebases device 0's round-1 copy (it started from round 1's cloud copy, the
    # devices' start in sequential rounds) onto what round 2's devices start from; device 1 reported in round 2, so
    # its copy is used as it is.
    fleet = FleetSpec(num_devices=2, availability_schedule=schedule(tmp_path, {1: [0, 1], 2: [1]}))
    plan = dcccl_plan(settings(tmp_path, rounds=2, fleet=fleet, aggregation=LatestUpdate()))
    fusion_1, fusion_2 = [step for step in plan if isinstance(step, FusionStep)]
    assert fusion_1.device_bases == (None, None) and fusion_1.rebase_onto is None
    run = tmp_path / "run"
    assert fusion_2.device_bases == (run / "rounds/round_001/cloud_round/co_submodel.pt", None)
    assert fusion_2.rebase_onto == run / "rounds/round_002/cloud_round/co_submodel.pt"
    assert set(fusion_2.inputs) == {run / "rounds/round_002/cloud_round/co_submodel.pt",
                                    run / "rounds/round_001/device_000/co_submodel.pt",
                                    run / "rounds/round_002/device_001/co_submodel.pt",
                                    run / "rounds/round_001/cloud_round/co_submodel.pt"}
    # Parallel rounds (the paper's order): every copy started from the round's start.
    parallel = dcccl_plan(settings(tmp_path, rounds=2, fleet=fleet, aggregation=LatestUpdate(), round_order="parallel"))
    fusion_2 = [step for step in parallel if isinstance(step, FusionStep)][1]
    assert fusion_2.device_bases == (run / "rounds/initial_co_submodel.pt", None)
    assert fusion_2.rebase_onto == run / "rounds/round_001/fusion/co_submodel.pt"


def test_fusion_rebases_a_stale_copy(tmp_path: Path) -> None:
    paths = {name: tmp_path / f"{name}_co_submodel.pt" for name in ("cloud", "stale", "base", "onto")}
    for seed, path in enumerate(paths.values()):
        torch.manual_seed(seed)
        write_fake_export(path, sample_count=100)
    fused, _ = fuse_exports(_fusion(tmp_path, paths["cloud"], (paths["stale"],), (paths["base"],), paths["onto"]))
    state = {name: load_export(path).state_dict for name, path in paths.items()}
    key = "head.weight"
    expected = 0.5 * state["cloud"][key] + 0.5 * (state["onto"][key] + state["stale"][key] - state["base"][key])
    torch.testing.assert_close(fused.state_dict[key], expected)
    var = "features.0.1.running_var"
    expected_var = 0.5 * state["cloud"][var] + 0.5 * state["stale"][var]
    torch.testing.assert_close(fused.state_dict[var], expected_var)
    with pytest.raises(ValueError, match="needs the model this round started from"):
        fuse_exports(_fusion(tmp_path, paths["cloud"], (paths["stale"],), (paths["base"],)))
