"""DC-CCL's targets read from a comparison: per-seed lead over the baselines, share and gap to the upper bound."""

from __future__ import annotations

from typing import Any

from dcccl.methods import registered
from dcccl.methods.comparison_report import build_comparison, markdown_table
from dcccl.methods.targets import targets

METHODS = [m.name for m in registered()]
FIDELITY = {"cloud_test": {"agreement": 0.9, "logit_mse": 0.1}, "device_test": {"agreement": 0.7, "logit_mse": 0.3}}
COSTS = {m: {k: 0 for k in ("device_params", "device_train_flops_per_sample", "device_peak_train_memory_bytes",
                            "downlink_bytes_per_round", "uplink_bytes_per_round", "downlink_bytes_once",
                            "uplink_bytes_once", "model_params")} for m in METHODS}


def _comparison(accuracies: dict[int, dict[str, tuple[float, float, float]]]) -> dict[str, Any]:
    results = {seed: {m: {"served/acc": acc[0], "served/acc_cloud_classes": acc[1], "served/acc_device_classes": acc[2],
                          "served/acc_per_round": [acc[0]]} for m, acc in per_method.items()}
               for seed, per_method in accuracies.items()}
    return build_comparison(results, COSTS, {s: FIDELITY for s in accuracies}, registered())


def _seed(dcccl: tuple[float, float, float], fedavg_acc: float) -> dict[str, tuple[float, float, float]]:
    rest = {m: (0.5, 0.7, 0.0) for m in METHODS}
    return {**rest, "small_fedavg": (fedavg_acc, 0.9, 0.1), "dcccl": dcccl, "centralized": (0.95, 0.96, 0.9)}


def test_every_target_met_when_dcccl_leads_on_every_seed_and_is_close_to_the_upper_bound() -> None:
    comparison = _comparison({0: _seed((0.93, 0.95, 0.85), 0.6), 1: _seed((0.94, 0.96, 0.83), 0.7)})
    found = {t.name: t for t in targets(comparison)}
    assert all(t.met for t in found.values()) and len(found) == 3
    lead = found["above every privacy-preserving baseline on every seed"]
    assert "+24.0 points, on seed 1," in lead.figure  # 0.94 - 0.7 on seed 1; seed 0 leads by 0.93 - 0.6
    share = found["device-only classes at least 90% of the centralized model's"]
    assert "84.0% against 90.0%: 93% of it" in share.figure
    assert "1.5 points below" in found["overall accuracy within 3 points of the centralized model's"].figure


def test_one_seed_behind_a_baseline_misses_the_first_target_and_the_table_says_so() -> None:
    comparison = _comparison({0: _seed((0.93, 0.95, 0.85), 0.6), 1: _seed((0.65, 0.9, 0.2), 0.7)})
    found = {t.name: t for t in targets(comparison)}
    lead = found["above every privacy-preserving baseline on every seed"]
    assert not lead.met and "-5.0 points, on seed 1, over Device-affordable small model (FedAvg)" in lead.figure
    assert not found["device-only classes at least 90% of the centralized model's"].met  # 52.5% of 90%
    assert not found["overall accuracy within 3 points of the centralized model's"].met  # 16 points below
    table = markdown_table(comparison)
    assert "- missed: above every privacy-preserving baseline on every seed" in table


def test_without_the_centralized_model_only_the_baselines_target_is_answered() -> None:
    comparison = _comparison({0: _seed((0.93, 0.95, 0.85), 0.6)})
    comparison["methods"].remove("centralized")
    assert [t.name for t in targets(comparison)] == ["above every privacy-preserving baseline on every seed"]
