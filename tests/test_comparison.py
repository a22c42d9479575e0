"""The comparison's wiring (fake stage runner), its report, and one tiny real run through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from dcccl.methods import METHODS, registered
from dcccl.methods.comparison import Comparison
from dcccl.methods.comparison_report import build_comparison, markdown_table, write_outputs
from dcccl.pipeline.config_snapshot import origin_of
from dcccl.pipeline.execution import PlanRun
from dcccl.pipeline.steps import StageCall
from tests.commands import dcccl
from tests.conftest import RecordingRunner
from tests.test_pipeline import STAGES, settings

METHOD_NAMES = [method.name for method in registered()]


class FakeRunner(RecordingRunner):
    """Evaluations report 0.5 (0.6 with the cloud submodel served, and 0.4 for the cloud submodel alone)."""

    def metrics(self, call: StageCall, output: Path) -> dict[str, Any]:
        served = 0.6 if call.model_args["cloud_submodel"] else 0.5
        metrics = {f"served/{k}": served for k in ("acc", "acc_cloud_classes", "acc_device_classes")}
        if call.model_args["cloud_submodel"]:
            metrics.update({f"cloud_only/{k}": 0.4 for k in ("acc", "acc_cloud_classes", "acc_device_classes")})
        return metrics

    def of(self, run_dir: Path) -> list[StageCall]:
        return [c for c in self.calls if c.work_dir.is_relative_to(run_dir) and
                (run_dir.name != "run" or "baselines" not in c.work_dir.parts)]


def execute(comparison: Comparison, runner: Any) -> dict[int, dict[str, dict[str, Any]]]:
    """Every method for every seed, as dcccl compare runs them."""
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in comparison.seeds:
        for run in comparison.runs(seed):
            plan_run = PlanRun(run.settings, run.plan, runner, metrics=run.metrics)
            results.setdefault(seed, {})[run.method.name] = plan_run.execute(None)
    return results


def test_every_method_is_registered_from_its_own_file() -> None:
    assert METHOD_NAMES == ["cloud_only", "small_fedavg", "device_only", "dcccl_no_control", "dcccl", "centralized"]
    assert {type(method).__module__ for method in METHODS.values()} == {
        f"dcccl.methods.{name}" for name in ("cloud_only", "small_fedavg", "device_only", "no_control", "dcccl",
                                             "centralized")}


def test_every_baseline_is_wired_from_dcccl_s_own_settings_and_artifacts(tmp_path: Path) -> None:
    runner = FakeRunner()
    results = execute(Comparison(settings(tmp_path, rounds=2, seed_everything=3)), runner)
    run = tmp_path / "run"
    by_method = {m: runner.of(run / "baselines" / m) for m in ("dcccl_no_control", "small_fedavg", "device_only",
                                                                 "centralized")}
    by_method["dcccl"] = runner.of(run)
    initial, cloud = str(run / "rounds/initial_co_submodel.pt"), str(run / "cloud/cloud_submodel.pt")
    # DC-CCL: the plain pipeline.
    assert [c.stage for c in by_method["dcccl"]] == ["cloud", "distill"] + ["cloud_round", "device", "evaluate"] * 2
    # Ablation: DC-CCL's cloud submodel and initial co-submodel (read in place), no distillation, unguided devices.
    ablation = by_method["dcccl_no_control"]
    assert [c.stage for c in ablation] == ["cloud_round", "device", "evaluate"] * 2
    assert all(c.model_args["control_model"] is None for c in ablation if c.stage == "device")
    assert all(c.model_args["guide"] == cloud for c in ablation if c.stage == "cloud_round")
    assert ablation[0].model_args["co_submodel"] == initial and ablation[0].model_args["initial_export_path"] is None
    # FedAvg: no large model anywhere, the cloud as a plain client of DC-CCL's own co-submodel, h served alone.
    fedavg = by_method["small_fedavg"]
    assert {c.stage for c in fedavg} == {"cloud_round", "device", "evaluate"}
    cloud_clients = [c for c in fedavg if c.stage == "cloud_round"]
    assert all(origin_of(c.config_files[-1]) == STAGES["fedavg_client"] and c.model_args["guide"] is None
               for c in cloud_clients)
    assert cloud_clients[0].model_args["co_submodel"] == initial
    assert all(c.model_args["cloud_submodel"] is None for c in fedavg if c.stage == "evaluate")
    fedavg_settings = METHODS["small_fedavg"].settings(settings(tmp_path))
    assert fedavg_settings.rule.cloud_share is None  # every copy weighted by its samples, the cloud's too
    # On-device only: device stages chained through their own copies from DC-CCL's initial co-submodel.
    device_only = by_method["device_only"]
    assert [c.stage for c in device_only] == ["device", "device", "evaluate"]
    assert device_only[0].model_args["co_submodel"] == initial
    assert device_only[1].model_args["co_submodel"] == str(device_only[0].devices[0].export)
    assert device_only[-1].model_args["cloud_submodel"] is None
    # Centralized: one stage on pooled samples with DC-CCL's architectures, evaluated as f + h.
    centralized = by_method["centralized"]
    assert [c.stage for c in centralized] == ["centralized", "evaluate"]
    assert centralized[0].partition == "pooled"
    assert centralized[0].model_args["cloud_architecture"] == cloud
    assert centralized[0].model_args["co_submodel"] == initial
    assert centralized[1].model_args["cloud_submodel"] == centralized[0].model_args["export_path"]
    assert all(c.seed == 3 for c in runner.calls)
    # Cloud-only comes from DC-CCL's evaluation of f alone.
    assert results[3]["cloud_only"] == {f"served/{k}": 0.4 for k in ("acc", "acc_cloud_classes", "acc_device_classes")}
    assert set(results[3]) == set(METHOD_NAMES)


class PerDeviceRunner(FakeRunner):
    """Device ``d``'s model alone scores 0.1 * (d + 1)."""

    def metrics(self, call: StageCall, output: Path) -> dict[str, Any]:
        if output.parent.name.startswith("device_"):
            device = int(output.parent.name.split("_")[1])
            return {f"served/{k}": 0.1 * (device + 1) for k in ("acc", "acc_cloud_classes", "acc_device_classes")}
        return super().metrics(call, output)


def test_on_device_only_baseline_of_a_fleet_trains_every_device_alone_and_averages(tmp_path: Path) -> None:
    from dcccl.federated.fleet import FleetSpec

    runner = PerDeviceRunner()
    results = execute(Comparison(settings(tmp_path, rounds=2, seed_everything=3,
                                          fleet=FleetSpec(num_devices=3, availability=0.5))), runner)
    device_only = runner.of(tmp_path / "run/baselines/device_only")
    trained = [c for c in device_only if c.stage == "device"]
    # Every device in every round (none needs the network), one device stage per round.
    assert [(c.round_index, [t.device for t in c.devices]) for c in trained] == [(1, [0, 1, 2]), (2, [0, 1, 2])]
    for first, second in zip(trained[0].devices, trained[1].devices):  # each device's chain of its own copies
        assert second.start == first.export and first.downlink == first.uplink == ()
    assert [c.stage for c in device_only].count("evaluate") == 3
    metrics = results[3]["device_only"]
    assert metrics["served/acc"] == pytest.approx(0.2)  # mean of 0.1, 0.2, 0.3
    assert [entry["served/acc"] for entry in metrics["per_device"]] == pytest.approx([0.1, 0.2, 0.3])
    assert metrics["served/acc_per_round"] == pytest.approx([0.2])
    assert metrics["transfers/uplink_bytes"] == 0  # nothing crosses the boundary
    assert (tmp_path / "run/baselines/device_only/accuracy_per_round.png").is_file()


def test_second_comparison_skips_everything_and_seeds_get_their_own_directories(tmp_path: Path) -> None:
    execute(Comparison(settings(tmp_path, rounds=2)), FakeRunner())
    again = FakeRunner()
    execute(Comparison(settings(tmp_path, rounds=2)), again)
    assert again.calls == []
    seeded = FakeRunner()
    comparison = Comparison(settings(tmp_path, rounds=2), seeds=[0, 1])
    results = execute(comparison, seeded)
    assert sorted(results) == [0, 1]
    assert comparison.seed_dir(1) == tmp_path / "run/seeds/seed_1"
    assert {c.seed for c in seeded.calls} == {0, 1}


def test_a_rebuilt_initial_co_submodel_reruns_the_methods_that_read_it(tmp_path: Path) -> None:
    import torch

    from dcccl.pipeline.plan import dcccl_plan

    execute(Comparison(settings(tmp_path, rounds=1)), FakeRunner())
    # DC-CCL's rounds run again (--from_stage rounds) and write a co-submodel with other weights.
    torch.manual_seed(123)
    reference = settings(tmp_path, rounds=1)
    PlanRun(reference, dcccl_plan(reference), FakeRunner(), restart_from="rounds").execute(None)
    again = FakeRunner()
    execute(Comparison(settings(tmp_path, rounds=1)), again)
    rerun = {call.work_dir.relative_to(tmp_path / "run").parts[:2] for call in again.calls}
    assert rerun == {("baselines", name) for name in ("device_only", "small_fedavg", "centralized",
                                                        "dcccl_no_control")}


def test_compare_needs_the_baseline_stage_configs(tmp_path: Path) -> None:
    from dcccl.errors import ConfigError

    stages = {name: path for name, path in STAGES.items() if name != "centralized"}
    with pytest.raises(ConfigError, match="stages.centralized"):
        Comparison(settings(tmp_path, stages=stages))


def _fake_results(seed_offsets: dict[int, float]) -> dict[int, dict[str, dict[str, Any]]]:
    results = {}
    for seed, offset in seed_offsets.items():
        per_method: dict[str, dict[str, Any]] = {}
        for i, method in enumerate(METHOD_NAMES):
            accuracy = {f"served/{k}": 0.1 * i + offset + 0.01 * j
                        for j, k in enumerate(("acc", "acc_cloud_classes", "acc_device_classes"))}
            per_method[method] = {**accuracy, "served/acc_per_round": [0.2 + offset, 0.3 + offset]}
        results[seed] = per_method
    return results


def _fake_costs() -> dict[str, dict[str, Any]]:
    keys = ("device_params", "device_train_flops_per_sample", "device_peak_train_memory_bytes",
            "downlink_bytes_per_round", "uplink_bytes_per_round", "downlink_bytes_once", "uplink_bytes_once",
            "model_params")
    return {m: {k: 1000 * (i + 1) for k in keys} for i, m in enumerate(METHOD_NAMES)}


def test_report_means_and_stds_over_seeds_and_table_matches_json(tmp_path: Path) -> None:
    fidelity = {s: {"cloud_test": {"agreement": 0.8, "logit_mse": 0.5},
                    "device_test": {"agreement": 0.6, "logit_mse": 0.7}} for s in (0, 1)}
    comparison = build_comparison(_fake_results({0: 0.0, 1: 0.1}), _fake_costs(), fidelity, registered())
    assert comparison["dcccl"]["acc"] == pytest.approx(0.45)  # mean of 0.4 and 0.5
    assert comparison["dcccl"]["acc_std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std of (0.4, 0.5)
    assert comparison["served_acc_per_round"]["dcccl"] == pytest.approx([0.25, 0.35])
    assert comparison["centralized"]["privacy_violating"] and not comparison["dcccl"]["privacy_violating"]
    paths = write_outputs(comparison, tmp_path)
    written = json.loads(paths["json"].read_text())
    rows = {line.split("|")[1].strip().rstrip(" ⚠"): line for line in paths["markdown"].read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| Method")}
    for method in METHOD_NAMES:
        cells = [c.strip() for c in rows[written[method]["title"]].split("|")[2:5]]
        for cell, key in zip(cells, ("acc", "acc_cloud_classes", "acc_device_classes")):
            mean, std = (float(v) for v in re.findall(r"[\d.]+", cell))
            assert mean == pytest.approx(100 * written[method][key], abs=0.05)
            assert std == pytest.approx(100 * written[method][f"{key}_std"], abs=0.05)
    for plot in ("accuracy_plot", "rounds_plot"):
        assert paths[plot].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_formats_units() -> None:
    fidelity = {0: {"cloud_test": {"agreement": 0.8, "logit_mse": 0.5}, "device_test": {"agreement": 0.6,
                                                                                       "logit_mse": 0.7}}}
    table = markdown_table(build_comparison(_fake_results({0: 0.0}), _fake_costs(), fidelity, registered()))
    assert "| 5 k | 5 kFLOP | 5 kB |" in table  # DC-CCL (5th method): 5000 params, FLOPs and bytes
    assert "80.0% / 0.500" in table and "Seeds: 0." in table


@pytest.mark.slow
def test_tiny_comparison_through_the_cli(tmp_path: Path) -> None:
    result = dcccl("compare", "--config", "configs/quickstart.yaml", "--run_dir", str(tmp_path), "--rounds", "1",
                   "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2",
                   "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert set(METHOD_NAMES) <= set(comparison)
    # On-device parameters: DC-CCL carries control + co-submodel, the small-model methods the co-submodel alone.
    assert comparison["dcccl"]["device_params"] == 2 * comparison["dcccl_no_control"]["device_params"]
    assert comparison["cloud_only"]["device_params"] == 0 and comparison["centralized"]["uplink_bytes_once"] > 0
    assert comparison["dcccl"]["downlink_bytes_once"] == comparison["dcccl"]["downlink_bytes_per_round"]
    assert comparison["dcccl"]["uplink_bytes_per_round"] == comparison["dcccl"]["downlink_bytes_per_round"] + 8
    assert comparison["centralized"]["model_params"] == comparison["dcccl"]["model_params"]
    for name in ("comparison.md", "comparison_accuracy.png", "comparison_rounds.png", "compare.yaml"):
        assert (tmp_path / name).is_file()
