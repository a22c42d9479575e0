"""Robust aggregation: the statistics against Flower's own implementations and hand-computed cases, each rule
against a poisoned copy, with a server optimiser after it, and named in a pipeline config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dcccl.errors import ConfigError
from dcccl.federated.aggregation import FedAdam, FedAvg
from dcccl.federated.aggregation.krum import Krum
from dcccl.federated.aggregation.median import Median
from dcccl.federated.aggregation.multi_krum import MultiKrum
from dcccl.federated.aggregation.norm_clipping import NormClipping
from dcccl.federated.aggregation.robust import coordinate_median, krum_scores, trimmed_mean
from dcccl.federated.aggregation.trimmed_mean import TrimmedMean
from tests.conftest import require_extra


def test_the_statistics_by_hand() -> None:
    values = torch.tensor([[1.0], [100.0], [3.0], [2.0]], dtype=torch.float64)
    assert coordinate_median(values).item() == 2.5  # the mean of the middle two, as numpy's
    assert coordinate_median(values[:3]).item() == 3.0
    five = torch.tensor([[-50.0], [1.0], [2.0], [3.0], [90.0]], dtype=torch.float64)
    assert trimmed_mean(five, 0.2).item() == 2.0  # one cut off each end
    assert trimmed_mean(five, 0.0).item() == pytest.approx(46.0 / 5)
    # Three copies at 0, 1, 2 on a line and one at 10; n - f - 2 = 1 nearest other with f = 1.
    flat = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)
    assert krum_scores(flat, byzantine=1).tolist() == [1.0, 1.0, 1.0, 64.0]


def test_the_statistics_are_flower_s() -> None:
    require_extra("flwr")
    from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

    rng = np.random.default_rng(0)
    copies = [[rng.normal(size=(3, 4)), rng.normal(size=5)] for _ in range(7)]
    results = [(copy, 10) for copy in copies]
    stacked = [torch.tensor(np.stack(layer)) for layer in zip(*copies)]
    for ours, theirs in zip([coordinate_median(s) for s in stacked], aggregate_median(results)):
        np.testing.assert_allclose(ours.numpy(), theirs)
    for ours, theirs in zip([trimmed_mean(s, 0.2) for s in stacked], aggregate_trimmed_avg(results, 0.2)):
        np.testing.assert_allclose(ours.numpy(), theirs)
    named = {"a": stacked[0], "b": stacked[1]}
    krum = Krum(byzantine=2)
    chosen = krum.chosen(named)[0]
    for ours, theirs in zip(copies[chosen], aggregate_krum(results, num_malicious=2, to_keep=0)):
        np.testing.assert_allclose(ours, theirs)
    kept = MultiKrum(byzantine=2, keep=3).chosen(named)
    mean = [np.mean([copies[i][layer] for i in kept], axis=0) for layer in range(2)]
    for ours, theirs in zip(mean, aggregate_krum(results, num_malicious=2, to_keep=3)):
        np.testing.assert_allclose(ours, theirs)


def fuse(rule, cloud: float, copies: list[float], counts: list[int] | None = None, start: float = 0.0) -> float:
    """The fused value of a one-weight network: the cloud's copy at ``cloud``, the devices' at ``copies``."""
    state = lambda value: {"w": torch.tensor([value]), "bn.n": torch.tensor(7)}  # noqa: E731
    counts = counts or [10] * len(copies)
    fused = rule.fuse(state(cloud), 40, counts, [(state(v), None) for v in copies], state(start), {"w"})
    assert fused["bn.n"].item() == 7  # integer buffers: the cloud's
    return float(fused["w"].item())


HONEST = [1.0, 1.2, 0.8, 1.1, 0.9]


@pytest.mark.parametrize(("rule", "devices"), [
    (Median(), 1.1),  # the middle of 0.8, 0.9, 1.0, 1.1, 1.2, 50, 60
    (TrimmedMean(trim=0.34), 1.1),  # two cut off each end: the mean of 1.0, 1.1, 1.2
    (MultiKrum(byzantine=2), 1.0),  # the five copies of lowest score: the honest ones
    # Updates from the start 0 are the values; the median norm, 1.1, bounds them all: 0.8, 0.9, 1.0, 1.1 stay, the
    # rest are cut to 1.1, and the seven weigh alike (equal counts).
    (NormClipping(), float(np.mean([1.0, 1.1, 0.8, 1.1, 0.9, 1.1, 1.1]))),
])
def test_two_poisoned_copies_cannot_drag_a_robust_rule(rule, devices: float) -> None:
    poisoned = HONEST + [50.0, 60.0]
    assert fuse(FedAvg(device_weighting="uniform"), 2.0, poisoned) > 8.0  # the mean is dragged far off
    assert fuse(rule, 2.0, poisoned) == pytest.approx(0.5 * 2.0 + 0.5 * devices)


def test_krum_chooses_an_honest_copy() -> None:
    fused = fuse(Krum(byzantine=2), 2.0, HONEST + [50.0, 60.0])
    assert (fused - 1.0) / 0.5 in [pytest.approx(v) for v in HONEST]
    # Scores with n - f - 2 = 3 nearest others: 0.06 for 1.0 (0.01 + 0.01 + 0.04), the lowest; ties go to the first.
    assert fused == pytest.approx(1.5)


def test_norm_clipping_with_a_fixed_bound_and_counts() -> None:
    fused = fuse(NormClipping(max_norm=0.5, cloud_share=0.0), 2.0, [0.2, 3.0], counts=[30, 10], start=1.0)
    # Updates -0.8 and +2.0 from the start 1.0, cut to -0.5 and +0.5, weighted 3:1: 1.0 + (-0.375 + 0.125).
    assert fused == pytest.approx(0.75)


def test_a_robust_rule_hands_its_aggregate_to_a_server_optimiser() -> None:
    rule = Median(server=FedAdam(server_lr=0.1))
    assert rule.keeps_server_state and rule.settings()["server"]["class"].endswith("FedAdam")
    mean = {"w": torch.tensor([1.0, -1.0])}
    start = {"w": torch.tensor([0.0, 0.0])}
    fused, state = rule.server_step(mean, start, {"w"}, {}, 1)
    expected, expected_state = FedAdam(server_lr=0.1).server_step(mean, start, {"w"}, {}, 1)
    assert torch.equal(fused["w"], expected["w"]) and state.keys() == expected_state.keys()
    with pytest.raises(ConfigError, match="must be a server optimiser"):
        Median(server=FedAvg())
    with pytest.raises(ConfigError, match=r"trim must lie in \[0, 0.5\)"):
        TrimmedMean(trim=0.5)


def test_a_robust_rule_is_named_in_a_pipeline_config(tmp_path: Path) -> None:
    from dcccl.commands.pipeline import pipeline_parser, settings_from

    configs = Path(__file__).resolve().parents[1] / "configs"
    parser = pipeline_parser()
    settings = settings_from(parser, parser.parse_args([
        "--config", str(configs / "fleet.yaml"), "--run_dir", str(tmp_path),
        "--aggregation", '{"class_path": "MultiKrum", "init_args": {"byzantine": 1, "server": {"class_path": '
                         '"FedAdam", "init_args": {"server_lr": 0.01}}}}']))
    rule = settings.rule
    assert isinstance(rule, MultiKrum) and rule.byzantine == 1 and isinstance(rule.server, FedAdam)
    with pytest.raises(ConfigError, match="looks at each device copy"):
        settings_from(parser, parser.parse_args([
            "--config", str(configs / "quickstart.yaml"), "--run_dir", str(tmp_path), "--aggregation", "Median",
            "--secure_aggregation", "{}"]))
