"""Tests of dcccl.federated.aggregation.averaging: weighted state-dict averaging and the fusion weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcccl.federated.aggregation.averaging import RunningAverage, fusion_weights, weighted_average


def _state(conv: list[float], mean: list[float], var: list[float], tracked: int) -> dict[str, torch.Tensor]:
    """A tiny state dict shaped like a conv layer followed by a two-channel BatchNorm."""
    return {
        "conv.weight": torch.tensor(conv, dtype=torch.float32).reshape(1, 1, 1, 2),
        "bn.running_mean": torch.tensor(mean, dtype=torch.float32),
        "bn.running_var": torch.tensor(var, dtype=torch.float32),
        "bn.num_batches_tracked": torch.tensor(tracked, dtype=torch.int64),
    }


@pytest.fixture
def two_states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """State A and state B with hand-checkable numbers."""
    a = _state(conv=[1.0, 2.0], mean=[0.0, 4.0], var=[1.0, 1.0], tracked=10)
    b = _state(conv=[3.0, 6.0], mean=[2.0, 0.0], var=[3.0, 5.0], tracked=30)
    return a, b


def test_equal_weights_give_the_midpoint(two_states: tuple[dict, dict]) -> None:
    a, b = two_states
    avg = weighted_average([a, b], [0.5, 0.5])
    # conv: (1+3)/2 = 2, (2+6)/2 = 4
    assert torch.equal(avg["conv.weight"], torch.tensor([2.0, 4.0]).reshape(1, 1, 1, 2))
    # running_mean: (0+2)/2 = 1, (4+0)/2 = 2
    assert torch.equal(avg["bn.running_mean"], torch.tensor([1.0, 2.0]))
    # running_var: (1+3)/2 = 2, (1+5)/2 = 3
    assert torch.equal(avg["bn.running_var"], torch.tensor([2.0, 3.0]))
    # the counter is taken from the first state dict (10), not averaged ((10+30)/2 = 20)
    assert avg["bn.num_batches_tracked"].item() == 10


def test_unequal_weights(two_states: tuple[dict, dict]) -> None:
    a, b = two_states
    avg = weighted_average([a, b], [0.75, 0.25])
    # conv: 0.75*1 + 0.25*3 = 1.5 ; 0.75*2 + 0.25*6 = 3.0
    assert torch.equal(avg["conv.weight"], torch.tensor([1.5, 3.0]).reshape(1, 1, 1, 2))
    # running_mean: 0.75*0 + 0.25*2 = 0.5 ; 0.75*4 + 0.25*0 = 3.0
    assert torch.equal(avg["bn.running_mean"], torch.tensor([0.5, 3.0]))
    # running_var: 0.75*1 + 0.25*3 = 1.5 ; 0.75*1 + 0.25*5 = 2.0
    assert torch.equal(avg["bn.running_var"], torch.tensor([1.5, 2.0]))
    assert avg["bn.num_batches_tracked"].item() == 10


def test_unnormalised_weights_are_normalised(two_states: tuple[dict, dict]) -> None:
    a, b = two_states
    # [3, 1] / 4 = [0.75, 0.25]
    raw = weighted_average([a, b], [3.0, 1.0])
    normalised = weighted_average([a, b], [0.75, 0.25])
    assert raw.keys() == normalised.keys()
    for key in raw:
        assert torch.equal(raw[key], normalised[key]), key


def test_counter_comes_from_the_first_state_dict(two_states: tuple[dict, dict]) -> None:
    a, b = two_states
    # B first: its counter (30) is kept, even with a small weight
    assert weighted_average([b, a], [0.1, 0.9])["bn.num_batches_tracked"].item() == 30
    assert weighted_average([a, b], [0.1, 0.9])["bn.num_batches_tracked"].item() == 10


def test_dtypes_and_shapes_are_preserved(two_states: tuple[dict, dict]) -> None:
    a, b = two_states
    a["half"], b["half"] = torch.tensor([1.0, 3.0], dtype=torch.float16), torch.tensor([3.0, 5.0], dtype=torch.float16)
    a["double"], b["double"] = torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    avg = weighted_average([a, b], [1.0, 1.0])
    for key in a:
        assert avg[key].dtype == a[key].dtype, key
        assert avg[key].shape == a[key].shape, key
    # (1+3)/2 = 2, (3+5)/2 = 4 in float16; (0.1+0.3)/2 = 0.2 accumulated in float64
    assert torch.equal(avg["half"], torch.tensor([2.0, 4.0], dtype=torch.float16))
    assert avg["double"].item() == pytest.approx(0.2, abs=1e-15)


def test_inputs_are_not_modified_and_result_does_not_alias_them(two_states: tuple[dict, dict]) -> None:
    a, b = two_states
    copies = [{k: v.clone() for k, v in s.items()} for s in (a, b)]
    avg = weighted_average([a, b], [0.5, 0.5])
    avg["bn.num_batches_tracked"] += 1
    avg["conv.weight"].zero_()
    for original, copy in zip((a, b), copies):
        for key in original:
            assert torch.equal(original[key], copy[key]), key


def test_single_state_dict_is_returned_unchanged(two_states: tuple[dict, dict]) -> None:
    a, _ = two_states
    avg = weighted_average([a], [0.3])
    for key in a:
        assert torch.equal(avg[key], a[key]), key


def test_running_average_matches_weighted_average(two_states: tuple[dict, dict]) -> None:
    a, b = two_states
    c = _state(conv=[5.0, -1.0], mean=[1.0, 1.0], var=[2.0, 2.0], tracked=7)
    running = RunningAverage()
    for state, weight in ((a, 1.0), (b, 2.0), (c, 1.0)):
        running.add(state, weight)
    result = running.result()
    # conv: (1*1 + 2*3 + 1*5)/4 = 12/4 = 3 ; (1*2 + 2*6 + 1*(-1))/4 = 13/4 = 3.25
    assert torch.equal(result["conv.weight"], torch.tensor([3.0, 3.25]).reshape(1, 1, 1, 2))
    # running_mean: (0 + 4 + 1)/4 = 1.25 ; (4 + 0 + 1)/4 = 1.25
    assert torch.equal(result["bn.running_mean"], torch.tensor([1.25, 1.25]))
    expected = weighted_average([a, b, c], [1.0, 2.0, 1.0])
    for key in expected:
        assert torch.equal(result[key], expected[key]), key


def test_zero_weight_state_dict_does_not_contribute(two_states: tuple[dict, dict]) -> None:
    a, b = two_states
    avg = weighted_average([a, b], [0.0, 1.0])
    assert torch.equal(avg["conv.weight"], b["conv.weight"])
    # the counter still comes from the first state dict, whatever its weight
    assert avg["bn.num_batches_tracked"].item() == 10


def test_real_batchnorm_state_dict_round_trips() -> None:
    first, second = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        second.weight.copy_(torch.tensor([3.0, 2.0, 1.0]))
        first.running_mean.copy_(torch.tensor([0.0, 1.0, 2.0]))
        second.running_mean.copy_(torch.tensor([4.0, 1.0, 0.0]))
    first.num_batches_tracked.fill_(5)
    second.num_batches_tracked.fill_(9)
    avg = weighted_average([first.state_dict(), second.state_dict()], [0.25, 0.75])
    target = nn.BatchNorm2d(3)
    target.load_state_dict(avg)  # strict: every key present with the right shape and dtype
    # weight: 0.25*[1,2,3] + 0.75*[3,2,1] = [2.5, 2.0, 1.5]
    assert torch.equal(target.weight.detach(), torch.tensor([2.5, 2.0, 1.5]))
    # running_mean: 0.25*[0,1,2] + 0.75*[4,1,0] = [3.0, 1.0, 0.5]
    assert torch.equal(target.running_mean, torch.tensor([3.0, 1.0, 0.5]))
    # bias and running_var are equal in both (0 and 1), so is their average
    assert torch.equal(target.bias.detach(), torch.zeros(3))
    assert torch.equal(target.running_var, torch.ones(3))
    assert target.num_batches_tracked.dtype == torch.int64
    assert target.num_batches_tracked.item() == 5


def test_weighted_average_errors(two_states: tuple[dict, dict]) -> None:
    a, b = two_states
    with pytest.raises(ValueError, match="2 state dicts but 3 weights"):
        weighted_average([a, b], [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average([a, b], [1.0, -0.5])
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_average([a, b], [0.0, 0.0])
    with pytest.raises(ValueError, match="nothing to average"):
        weighted_average([], [])
    extra = dict(b, **{"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="different keys.*extra.weight"):
        weighted_average([a, extra], [0.5, 0.5])
    missing = {k: v for k, v in b.items() if k != "bn.running_var"}
    with pytest.raises(ValueError, match="different keys.*bn.running_var"):
        weighted_average([a, missing], [0.5, 0.5])


def test_running_average_result_without_adds_fails() -> None:
    with pytest.raises(ValueError, match="nothing to average"):
        RunningAverage().result()


# ---------------------------------------------------------------------------------------------------------------------
# fusion_weights


def test_fusion_weights_cloud_share_and_sample_counts() -> None:
    # devices share 1 - 0.5 = 0.5 by counts 100:300 -> 0.5*0.25 = 0.125, 0.5*0.75 = 0.375
    assert fusion_weights(1000, [100, 300], cloud_share=0.5) == pytest.approx([0.5, 0.125, 0.375])


def test_fusion_weights_cloud_count_is_ignored_with_a_cloud_share() -> None:
    assert fusion_weights(1, [100, 300], cloud_share=0.5) == fusion_weights(10**6, [100, 300], cloud_share=0.5)


def test_fusion_weights_uniform_device_weighting() -> None:
    # devices share 1 - 0.2 = 0.8 equally among 4: 0.2 each, whatever their counts
    weights = fusion_weights(50, [1, 10, 100, 1000], cloud_share=0.2, device_weighting="uniform")
    assert weights == pytest.approx([0.2, 0.2, 0.2, 0.2, 0.2])
    # zero counts are fine when the counts are not used
    assert fusion_weights(50, [0, 0], cloud_share=0.5, device_weighting="uniform") == pytest.approx([0.5, 0.25, 0.25])


def test_fusion_weights_plain_sample_counts_without_cloud_share() -> None:
    # total 200 + 100 + 300 = 600 -> 200/600, 100/600, 300/600
    assert fusion_weights(200, [100, 300], cloud_share=None) == pytest.approx([1 / 3, 1 / 6, 1 / 2])


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_fusion_weights_sum_to_one(share: float) -> None:
    weights = fusion_weights(10, [7, 11, 13], cloud_share=share)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] == share
    assert len(weights) == 4


def test_fusion_weights_without_devices() -> None:
    assert fusion_weights(123, []) == [1.0]


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_fusion_weights_cloud_share_out_of_range(share: float) -> None:
    with pytest.raises(ValueError, match=r"cloud_share must lie in \[0, 1\]"):
        fusion_weights(10, [1, 2], cloud_share=share)


def test_fusion_weights_count_errors() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        fusion_weights(10, [5, -1])
    with pytest.raises(ValueError, match="non-negative"):
        fusion_weights(-10, [5, 1])
    with pytest.raises(ValueError, match="non-negative"):
        fusion_weights(10, [-5, 1], cloud_share=None)
    with pytest.raises(ValueError, match="device sample counts sum to zero"):
        fusion_weights(10, [0, 0], cloud_share=0.5)
    with pytest.raises(ValueError, match="sample counts sum to zero"):
        fusion_weights(0, [0, 0], cloud_share=None)


def test_fusion_weights_drive_weighted_average(two_states: tuple[dict, dict]) -> None:
    """The cloud copy (A) and one device copy (B) fused with cloud_share 0.75 give the 0.75/0.25 average."""
    a, b = two_states
    weights = fusion_weights(500, [40], cloud_share=0.75)
    assert weights == [0.75, 0.25]
    fused = weighted_average([a, b], weights)
    assert torch.equal(fused["conv.weight"], torch.tensor([1.5, 3.0]).reshape(1, 1, 1, 2))


def test_a_rule_of_ones_own_is_one_class_named_in_the_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A new aggregation rule is one file: named by class path, it is what the fusion step averages with."""
    from pathlib import Path

    from dcccl.commands.pipeline import pipeline_parser, settings_from
    from dcccl.pipeline.fusion import FusionStep, fuse_exports
    from dcccl.pipeline.plan import dcccl_plan
    from tests.conftest import write_fake_export
    from tests.custom_rule import EqualShares

    configs = Path(__file__).resolve().parents[1] / "configs"
    parser = pipeline_parser()
    settings = settings_from(parser, parser.parse_args([
        "--config", str(configs / "quickstart.yaml"), "--run_dir", str(tmp_path), "--rounds", "1",
        "--aggregation", '{"class_path": "tests.custom_rule.EqualShares"}']))
    assert isinstance(settings.rule, EqualShares)
    fusion = next(step for step in dcccl_plan(settings) if isinstance(step, FusionStep))
    assert fusion.rule is settings.rule and fusion.describe()["rule"]["class"] == "tests.custom_rule.EqualShares"
    for path, seed, count in ((fusion.cloud_copy, 1, 2800), (fusion.device_copies[0], 2, 1200)):
        torch.manual_seed(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_fake_export(path, sample_count=count)
    fused, _ = fuse_exports(fusion)
    cloud, device = (torch.load(path, weights_only=True)["state_dict"]["head.weight"]
                     for path in (fusion.cloud_copy, fusion.device_copies[0]))
    torch.testing.assert_close(fused.state_dict["head.weight"], 0.5 * cloud + 0.5 * device)


def test_class_aware_rows_come_from_the_copies_that_hold_the_class() -> None:
    """Classes 0 (cloud only), 1 (device only), 2 (shared): hand-checked rows of a 3-class head."""
    from dcccl.federated.aggregation import FedAvg

    rule = FedAvg(cloud_share=0.5, class_aware_head=True)
    counts = [[10, 0, 5], [0, 30, 5], [0, 10, 0]]  # cloud, device A, device B
    weights = rule.weights(10, [35, 10])
    assert weights == pytest.approx([0.5, 0.5 * 35 / 45, 0.5 * 10 / 45])
    rows = rule.row_weights(weights, counts)
    assert rows == [[1.0, 0.0, 0.0], [0.0, 30.0, 10.0], list(weights)]
    head = {"head.weight": torch.tensor([[1.0], [1.0], [1.0]]), "head.bias": torch.zeros(3), "body": torch.ones(1)}
    cloud = {key: value * 1 for key, value in head.items()}
    device_a = {key: value * 2 for key, value in head.items()}
    device_b = {key: value * 4 for key, value in head.items()}
    fused = rule.fuse(cloud, 10, [35, 10], [(device_a, None), (device_b, None)], None, {"head.weight", "body"},
                      head_keys={"head.weight", "head.bias"}, class_counts=counts)
    plain = 0.5 * 1 + weights[1] * 2 + weights[2] * 4
    assert fused["body"].item() == pytest.approx(plain)  # the body as plain FedAvg
    assert fused["head.weight"][:, 0].tolist() == pytest.approx([1.0, (30 * 2 + 10 * 4) / 40, plain])
    with pytest.raises(ValueError, match="class counts|samples per class"):
        rule.row_weights(weights, None)
    assert FedAvg().row_weights(weights, counts) is None and not FedAvg().needs_class_counts


def test_margin_loss_stops_pushing_once_a_sample_is_right_by_the_margin() -> None:
    from dcccl.model.losses import margin_loss

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.5, 1.0, 0.0]], requires_grad=True)
    target = torch.tensor([0, 0])
    loss = margin_loss(logits, target, margin=1.0)
    # sample 0: 3 - 1 = 2 >= 1, nothing; sample 1: 1 - (0.5 - 1.0) = 1.5
    assert loss.item() == pytest.approx(1.5 / 2)
    loss.backward()
    assert logits.grad is not None and logits.grad[0].abs().sum() == 0
    assert logits.grad[1].tolist() == pytest.approx([-0.5, 0.5, 0.0])
