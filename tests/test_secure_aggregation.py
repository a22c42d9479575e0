"""Secure aggregation in the plan: which rules allow it, what the cloud receives (the mean, nothing per device), where
it runs; the devices' state chains from round to round; the mean update's arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dcccl.errors import ConfigError
from dcccl.federated.aggregation import FedAvg, LatestUpdate
from dcccl.federated.compression import Compression
from dcccl.federated.fleet import FleetSpec
from dcccl.federated.privacy import DifferentialPrivacy
from dcccl.federated.secure_aggregation import (
    SecureAggregation,
    apply_mean_update,
    quantization_tolerance,
    update_arrays,
)
from dcccl.pipeline.fusion import FusionStep
from dcccl.pipeline.plan import dcccl_plan
from dcccl.pipeline.steps import StageCall
from tests.conftest import require_extra
from tests.test_pipeline import settings

FLEET = FleetSpec(num_devices=4, sample_fraction=0.5, availability=1.0)


@pytest.mark.parametrize(("rule", "reason"), [(LatestUpdate(), "in the clear"),
                                              (FedAvg(class_aware_head=True), "class-aware"),
                                              (FedAvg(cloud_share=None, device_weighting="uniform"), "number of")])
def test_rules_that_need_more_than_the_mean_refuse_secure_aggregation(tmp_path: Path, rule: object,
                                                                      reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        settings(tmp_path, fleet=FLEET, aggregation=rule, secure_aggregation=SecureAggregation())
    with pytest.raises(ConfigError, match="do not combine"):
        settings(tmp_path, fleet=FLEET, secure_aggregation=SecureAggregation(), compression=Compression())
    with pytest.raises(ConfigError, match="shares"):
        SecureAggregation(num_shares=0.0)


def test_the_cloud_receives_only_the_mean_of_a_round_s_copies(tmp_path: Path) -> None:
    chosen = settings(tmp_path, fleet=FLEET, rounds=2, secure_aggregation=SecureAggregation(max_weight=500.0),
                      aggregation=FedAvg(device_weighting="uniform"))
    plan = dcccl_plan(chosen)
    run = chosen.run
    calls = [step for step in plan if isinstance(step, StageCall) and step.stage == "device"]
    fusions = [step for step in plan if isinstance(step, FusionStep)]
    for r, (call, fusion) in enumerate(zip(calls, fusions), start=1):
        assert call.secure_sum is not None and call.secure_sum.path == run.secure_sum(r)
        assert call.outputs == (run.secure_sum(r),) and not call.secure_sum.weight_by_samples
        assert call.secure_sum.settings.max_weight == 500.0
        assert all(task.uplink == (run.secure_sum(r),) for task in call.devices)
        assert fusion.device_copies == (run.secure_sum(r),) and fusion.inputs[1] == run.secure_sum(r)
        assert "secure_sum" in call.describe()


def test_a_device_s_state_chains_from_the_last_round_it_took_part_in(tmp_path: Path) -> None:
    chosen = settings(tmp_path, fleet=FLEET, rounds=4, privacy=DifferentialPrivacy(noise_multiplier=1.0))
    run = chosen.run
    last: dict[int, int] = {}
    for call in (s for s in dcccl_plan(chosen) if isinstance(s, StageCall) and s.stage == "device"):
        assert call.model_args["privacy"]["rounds"] == 4  # the target covers the whole run
        for task in call.devices:
            expected = run.device_state(last[task.device], task.device) if task.device in last else None
            assert task.state_in == expected and task.state_out == run.device_state(call.round_index, task.device)
            last[task.device] = call.round_index
    assert last  # some device took part
    plain = dcccl_plan(settings(tmp_path, fleet=FLEET, rounds=2))
    assert all(task.state_out is None for s in plain if isinstance(s, StageCall) for task in s.devices)


def test_the_mean_update_lands_on_the_start_and_leaves_counters_alone() -> None:
    start = {"w": torch.ones(2, 3), "n": torch.tensor(5), "b": torch.zeros(3)}
    copies = [{"w": torch.full((2, 3), 3.0), "n": torch.tensor(9), "b": torch.ones(3)},
              {"w": torch.full((2, 3), 2.0), "n": torch.tensor(7), "b": -torch.ones(3)}]
    updates = [update_arrays(copy, start) for copy in copies]
    assert [a.shape for a in updates[0]] == [(2, 3), (3,)]  # only the float tensors, in order
    mean = [(3 * a + 1 * b) / 4 for a, b in zip(*updates)]
    fused = apply_mean_update(start, mean)
    assert torch.allclose(fused["w"], torch.full((2, 3), 2.75)) and torch.allclose(fused["b"], torch.full((3,), 0.5))
    assert int(fused["n"]) == 5
    with pytest.raises(ValueError):
        apply_mean_update(start, mean[:1])
    loose = quantization_tolerance(SecureAggregation(), [10.0, 10.0])
    assert quantization_tolerance(SecureAggregation(), [1000.0, 1000.0]) < loose
    assert np.isfinite(loose)


def test_flower_refuses_a_secure_round_of_one_device(tmp_path: Path) -> None:
    require_extra("flwr")
    from dcccl.flower.server_app import FlowerDevices

    one = settings(tmp_path, secure_aggregation=SecureAggregation())  # the quickstart's single device
    call = next(s for s in dcccl_plan(one) if isinstance(s, StageCall) and s.stage == "device")
    with pytest.raises(ConfigError, match="at least two devices"):
        FlowerDevices(None, None).resolve(call)  # type: ignore[arg-type]


def test_a_simulated_fleet_refuses_secure_aggregation(tmp_path: Path) -> None:
    from dcccl.commands.stage_runner import LightningStageRunner

    chosen = settings(tmp_path, fleet=FLEET, secure_aggregation=SecureAggregation())
    call = next(s for s in dcccl_plan(chosen) if isinstance(s, StageCall) and s.stage == "device")
    with pytest.raises(ConfigError, match="secure_aggregation runs on Flower"):
        LightningStageRunner().resolve(call)
