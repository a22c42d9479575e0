"""Server optimisers over the rounds' fused updates (FedAvgM, FedAdam, FedYogi): hand-computed steps over two
rounds with their state carried, FedAvg as the special case, and a run killed between rounds that resumes to the
very same co-submodel and state as one never interrupted."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from dcccl.artifacts.exports import NetworkExport, load_export, save_export
from dcccl.errors import ConfigError
from dcccl.federated.aggregation import FedAdam, FedAvg, FedAvgM, FedYogi, LatestUpdate
from dcccl.federated.aggregation.rule import ServerState
from dcccl.federated.fleet import FleetSpec
from dcccl.pipeline.fusion import FusionStep, fuse_exports
from dcccl.pipeline.plan import dcccl_plan
from dcccl.pipeline.settings import PipelineSettings
from dcccl.pipeline.steps import StageCall
from tests.conftest import FAKE_SPEC, RecordingRunner
from tests.test_pipeline import execute, settings

PARAMETERS = {"w"}


def two_rounds(rule: Any, start: list[float], means: list[list[float]]) -> list[list[float]]:
    """The co-submodel after each round: round r's fused mean is ``means[r]``, its start the previous result."""
    state: ServerState = {}
    model = {"w": torch.tensor(start), "bn.running_mean": torch.tensor([0.0])}
    results = []
    for round_index, mean in enumerate(means, start=1):
        fused = {"w": torch.tensor(mean), "bn.running_mean": torch.tensor([float(round_index)])}
        model, state = rule.server_step(fused, model, PARAMETERS, state, round_index)
        # Buffers are averaged, not optimised: the mean's batch-norm statistics are taken as they are.
        assert model["bn.running_mean"].item() == round_index and model["w"].dtype == torch.float32
        results.append(model["w"].tolist())
    return results


def test_fedavgm_adds_momentum_to_the_rounds_update() -> None:
    rule = FedAvgM(server_lr=2.0, momentum=0.5)
    # Round 1: delta = [2, 1] - [1, 2] = [1, -1]; v = [1, -1]; w = [1, 2] + 2 * v = [3, 0].
    # Round 2: delta = [3.5, 0.5] - [3, 0] = [0.5, 0.5]; v = 0.5 * [1, -1] + [0.5, 0.5] = [1, 0]; w = [3, 0] + 2v.
    assert two_rounds(rule, [1.0, 2.0], [[2.0, 1.0], [3.5, 0.5]]) == [[3.0, 0.0], [5.0, 0.0]]


def test_fedavgm_without_momentum_at_rate_one_is_fedavg() -> None:
    assert two_rounds(FedAvgM(server_lr=1.0, momentum=0.0), [1.0, 2.0], [[2.0, 1.0], [3.5, 0.5]]) == [
        [2.0, 1.0], [3.5, 0.5]]


def test_fedadam_two_rounds_by_hand() -> None:
    rule = FedAdam(server_lr=1.0, beta1=0.5, beta2=0.75, tau=2.0, bias_correction=False)
    # Round 1: delta = 4; m = 0.5 * 4 = 2; v = 0.25 * 16 = 4; step = 2 / (sqrt(4) + 2) = 0.5.
    # Round 2: delta = -4; m = 0.5 * 2 + 0.5 * -4 = -1; v = 0.75 * 4 + 0.25 * 16 = 7; step = -1 / (sqrt(7) + 2).
    first, second = two_rounds(rule, [0.0], [[4.0], [0.5 - 4.0]])
    assert first == [0.5]
    assert second[0] == pytest.approx(0.5 - 1 / (math.sqrt(7) + 2), abs=1e-6)


def test_fedadam_bias_correction_scales_the_rate_by_round() -> None:
    rule = FedAdam(server_lr=1.0, beta1=0.5, beta2=0.75, tau=2.0, bias_correction=True)
    # Round 1: sqrt(1 - 0.75) / (1 - 0.5) = 1, the same step; round 2: sqrt(1 - 0.5625) / (1 - 0.25).
    first, second = two_rounds(rule, [0.0], [[4.0], [0.5 - 4.0]])
    assert first == [0.5]
    assert second[0] == pytest.approx(0.5 - math.sqrt(0.4375) / 0.75 / (math.sqrt(7) + 2), abs=1e-6)


def test_fedyogi_second_moment_grows_additively() -> None:
    rule = FedYogi(server_lr=1.0, beta1=0.5, beta2=0.75, tau=2.0, bias_correction=False)
    # Round 1 as Adam from zero: v = 0 - 0.25 * 16 * sign(0 - 16) = 4, step 0.5.
    # Round 2: v = 4 - 0.25 * 16 * sign(4 - 16) = 8 (Adam: 7); m = -1; step = -1 / (sqrt(8) + 2).
    first, second = two_rounds(rule, [0.0], [[4.0], [0.5 - 4.0]])
    assert first == [0.5]
    assert second[0] == pytest.approx(0.5 - 1 / (math.sqrt(8) + 2), abs=1e-6)


def test_every_coordinate_moves_by_about_the_server_rate_however_small_the_update() -> None:
    start = [0.0, 0.0]
    tiny = two_rounds(FedAdam(server_lr=0.01, tau=1e-6), start, [[1e-3, -1e-2]])
    assert tiny[0] == pytest.approx([0.01, -0.01], rel=1e-2)
    assert two_rounds(FedAvg(), start, [[1e-3, -1e-2]])[0] == pytest.approx([1e-3, -1e-2])  # FedAvg: the mean


@pytest.mark.parametrize("kwargs, message", [
    ({"server_lr": 0.0}, "server_lr must be positive"),
    ({"momentum": 1.0}, "momentum must lie in"),
])
def test_bad_fedavgm_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedAvgM(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"beta2": 1.0}, "beta2 must lie in"), ({"tau": 0.0}, "tau must be positive"), ({"server_lr": -1.0}, "positive")])
def test_bad_fedadam_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedAdam(**kwargs)


def test_a_kept_state_that_does_not_fit_the_co_submodel_is_refused() -> None:
    state: ServerState = {"momentum": {"w": torch.zeros(3)}}
    with pytest.raises(ConfigError, match="does not fit the co-submodel"):
        FedAvgM().server_step({"w": torch.zeros(2)}, {"w": torch.zeros(2)}, PARAMETERS, state, 2)


def test_secure_aggregation_is_allowed_unless_offline_updates_are_reapplied() -> None:
    assert FedAdam().secure_aggregation_refusal() is None
    assert "in the clear" in str(FedAvgM(latest_updates=True).secure_aggregation_refusal())
    fleet = FleetSpec(num_devices=6, sample_fraction=0.5)
    latest = FedYogi(latest_updates=True).fused_copies(fleet, 0, 3)
    assert latest == LatestUpdate().fused_copies(fleet, 0, 3)


def test_the_plan_hands_each_fusion_the_round_start_and_the_state_of_the_round_before(tmp_path: Path) -> None:
    plan = dcccl_plan(settings(tmp_path, rounds=2, aggregation=FedAdam()))
    first, second = [step for step in plan if isinstance(step, FusionStep)]
    run = tmp_path / "run"
    assert first.round_start == run / "rounds/initial_co_submodel.pt" and first.state_in is None
    assert first.outputs == (run / "rounds/round_001/fusion/co_submodel.pt",
                             run / "rounds/round_001/fusion/replies.json",
                             run / "rounds/round_001/fusion/server_state.pt")
    assert second.round_start == run / "rounds/round_001/fusion/co_submodel.pt"
    assert second.state_in == run / "rounds/round_001/fusion/server_state.pt"
    assert {second.round_start, second.state_in} <= set(second.inputs)
    stateless = [step for step in dcccl_plan(settings(tmp_path, rounds=2)) if isinstance(step, FusionStep)]
    assert all(len(step.outputs) == 2 and step.state_out is None for step in stateless)


class SeededRunner(RecordingRunner):
    """Writes copies whose weights follow from their path (the same run writes the same files), and can fail at
    one call as a killed process would."""

    def __init__(self, fail_at: str = "") -> None:
        super().__init__()
        self.fail_at = fail_at

    def metrics(self, call: StageCall, output: Path) -> dict[str, Any]:
        return {"served/acc": 0.5, "cloud_only/acc": 0.4}

    def __call__(self, call: StageCall, resume: bool = False) -> None:
        if call.label == self.fail_at:
            raise KeyboardInterrupt(call.label)
        self.calls.append(call)
        for output in call.outputs:
            output.parent.mkdir(parents=True, exist_ok=True)
            if output.suffix == ".json":
                output.write_text('{"served/acc": 0.5, "cloud_only/acc": 0.4}')
                continue
            torch.manual_seed(zlib.crc32("/".join(output.parts[output.parts.index("run"):]).encode()))
            role = "cloud_submodel" if "cloud_submodel" in output.name else (
                "control_model" if "control_model" in output.name else "co_submodel")
            save_export(NetworkExport.of(FAKE_SPEC.build(10, 1), role, FAKE_SPEC, 10, 1, 100), output)


def _tensors(path: Path) -> dict[str, Any]:
    return dict(torch.load(path, weights_only=True))


def test_a_run_killed_between_rounds_resumes_to_the_same_model_and_state(tmp_path: Path) -> None:
    def adam(name: str) -> PipelineSettings:
        return settings(tmp_path / name, rounds=3, aggregation=FedAdam(server_lr=0.05),
                        fleet=FleetSpec(num_devices=3, sample_fraction=0.7))

    execute(adam("whole"), SeededRunner())
    with pytest.raises(KeyboardInterrupt):
        execute(adam("killed"), SeededRunner(fail_at="round 3/3: cloud side"))
    resumed = SeededRunner()
    execute(adam("killed"), resumed)
    assert [call.label for call in resumed.calls][0] == "round 3/3: cloud side"  # rounds 1-2 were not run again
    whole, killed = tmp_path / "whole/run/rounds", tmp_path / "killed/run/rounds"
    fused_3 = load_export(killed / "round_003/fusion/co_submodel.pt").state_dict
    for key, value in load_export(whole / "round_003/fusion/co_submodel.pt").state_dict.items():
        assert torch.equal(fused_3[key], value), key
    kept, expected = _tensors(killed / "round_003/fusion/server_state.pt"), _tensors(whole / "round_003/fusion/"
                                                                                      "server_state.pt")
    assert kept["round"] == expected["round"] == 3
    for group, tensors in expected["state"].items():
        for key, value in tensors.items():
            assert torch.equal(kept["state"][group][key], value), (group, key)
    # Round 3's first moment is 0.9 * round 2's (read back from disk by the resumed run) + 0.1 * round 3's update.
    fusion_3 = [step for step in dcccl_plan(adam("killed")) if isinstance(step, FusionStep)][2]
    mean_3, _ = fuse_exports(replace(fusion_3, rule=FedAvg(), state_out=None))
    start_3 = load_export(killed / "round_002/fusion/co_submodel.pt").state_dict
    kept_2 = _tensors(killed / "round_002/fusion/server_state.pt")["state"]["first_moment"]
    key = "head.weight"
    update_3 = mean_3.state_dict[key].double() - start_3[key].double()
    torch.testing.assert_close(kept["state"]["first_moment"][key], 0.9 * kept_2[key] + 0.1 * update_3)
    assert kept_2[key].abs().sum() > 0


@pytest.mark.slow
def test_a_fleet_with_a_server_optimiser_through_the_cli(tmp_path: Path) -> None:
    from tests.commands import dcccl

    result = dcccl("pipeline", "--config", "configs/fleet.yaml", "--run_dir", str(tmp_path), "--rounds", "2",
                   "--fleet.num_devices", "4", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                   "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
                   "--aggregation",
                   '{"class_path": "FedYogi", "init_args": {"server_lr": 0.02, "latest_updates": true}}')
    assert result.returncode == 0, result.stderr[-3000:]
    for round_index in (1, 2):
        kept = _tensors(tmp_path / f"rounds/round_{round_index:03d}/fusion/server_state.pt")
        assert kept["round"] == round_index and set(kept["state"]) == {"first_moment", "second_moment"}
    # Round 2 moved each weight from round 1's result by about the server's rate at most: in round 2 the rate is
    # 0.02 * sqrt(1 - 0.99**2) / (1 - 0.9**2) = 0.0149, and |m| / sqrt(v) <= 1.35 for Yogi's moments of two updates.
    start = load_export(tmp_path / "rounds/round_001/fusion/co_submodel.pt").state_dict
    fused = load_export(tmp_path / "rounds/round_002/fusion/co_submodel.pt").state_dict
    moved = max((fused[key] - start[key]).abs().max().item() for key in _tensors(
        tmp_path / "rounds/round_002/fusion/server_state.pt")["state"]["first_moment"])
    print(f'largest move {moved:.4f}')
    assert 0 < moved <= 0.0149 * 1.35
    manifest = json.loads((tmp_path / "manifest.json").read_text())["artifacts"]
    assert "rounds/round_002/fusion/server_state.pt" in manifest
