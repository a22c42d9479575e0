"""The attack switch of simulated fleets: what a lying device sends, which devices lie, and a fleet where one
device inflates its sample count: its reply is refused, the round fuses the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcccl.errors import ConfigError
from dcccl.federated.attacks import Attack, corrupt_weights, flip_labels, inflate_counts

START = {"w": torch.tensor([1.0, 2.0]), "bn.running_mean": torch.tensor([0.5]), "bn.num_batches": torch.tensor(3)}
COPY = {"w": torch.tensor([1.5, 1.0]), "bn.running_mean": torch.tensor([0.7]), "bn.num_batches": torch.tensor(4)}
PARAMETERS = {"w"}


@pytest.mark.parametrize(("kind", "expected"), [
    ("sign_flip", [1.0 - 10 * 0.5, 2.0 + 10 * 1.0]),  # the start minus ten times the update (+0.5, -1.0)
    ("scale", [1.0 + 10 * 0.5, 2.0 - 10 * 1.0]),
    ("inflate_count", [1.5, 1.0]),  # the weights as trained
])
def test_an_attacked_update_by_hand(kind: str, expected: list[float]) -> None:
    sent = corrupt_weights(Attack(kind=kind), COPY, START, PARAMETERS)  # type: ignore[arg-type]
    assert sent["w"].tolist() == expected
    # Buffers go up as trained: the attack is on what the rule averages as an update.
    assert sent["bn.running_mean"].item() == pytest.approx(0.7) and sent["bn.num_batches"].item() == 4


def test_nan_noise_and_counts() -> None:
    assert torch.isnan(corrupt_weights(Attack(kind="nan"), COPY, START, PARAMETERS)["w"]).all()
    noisy = corrupt_weights(Attack(kind="noise", noise_std=0.0), COPY, START, PARAMETERS)
    assert noisy["w"].tolist() == [1.5, 1.0]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, generator=torch.Generator().manual_seed(0)) * 2.0
    noisy = corrupt_weights(Attack(kind="noise", noise_std=2.0), COPY, START, PARAMETERS, generator)
    torch.testing.assert_close(noisy["w"], COPY["w"] + noise)
    assert inflate_counts(Attack(kind="inflate_count", factor=1000), 12, [0, 5, 7]) == (12000, [0, 5000, 7000])
    assert inflate_counts(Attack(kind="sign_flip"), 12, [0, 5, 7]) == (12, [0, 5, 7])
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]


def test_which_devices_lie() -> None:
    drawn = Attack(devices=4).attacked(20, seed=0)
    assert len(drawn) == 4 and drawn == sorted(set(drawn)) and all(0 <= d < 20 for d in drawn)
    assert Attack(devices=4).attacked(20, seed=0) == drawn  # the same seed, the same devices
    assert Attack(devices=4).attacked(20, seed=1) != drawn
    assert Attack(devices=[3, 1, 3]).attacked(20, seed=0) == [1, 3]
    assert Attack(devices=0).attacked(20, seed=0) == []
    with pytest.raises(ConfigError, match=r"attack devices \[25\] are not in the fleet of 20 devices"):
        Attack(devices=[25]).attacked(20, seed=0)
    with pytest.raises(ConfigError, match="attack devices: 30 of a fleet of 20 devices"):
        Attack(devices=30).attacked(20, seed=0)
    with pytest.raises(ConfigError, match="attack kind must be one of"):
        Attack(kind="flood")  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_fleet_refuses_the_reply_of_a_lying_device_and_fuses_the_others(tmp_path: Path) -> None:
    """Device 1 reports ten times the samples it holds: the cloud knows its share from the data partition."""
    from dcccl.artifacts.exports import load_export
    from tests.commands import dcccl

    result = dcccl("pipeline", "--config", "configs/fleet.yaml", "--rounds", "1", "--fleet.num_devices", "4",
                   "--fleet.sample_fraction", "1.0", "--fleet.availability", "1.0", "--trainer.max_steps", "2",
                   "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2",
                   "--trainer.enable_progress_bar", "false", "--run_dir", str(tmp_path),
                   "--attack", json.dumps({"devices": [1], "kind": "inflate_count"}))
    assert result.returncode == 0, result.stderr[-3000:]
    partition = json.loads((tmp_path / "fleet/partition.json").read_text())
    held = partition["devices"][1]["samples"]
    assert f"refused device 1's copy of round 1: it reports {10 * held:,} samples but the device holds {held:,}" \
        in result.stderr
    verdicts = json.loads((tmp_path / "rounds/round_001/fusion/replies.json").read_text())["replies"]
    assert [(v["device"], v["accepted"]) for v in verdicts] == [(0, True), (1, False), (2, True), (3, True)]
    ledger = json.loads((tmp_path / "transfers.json").read_text())["transfers"]
    up = [t for t in ledger if t["direction"] == "up" and t["what"] == "co_submodel"]
    assert [t["device"] for t in up if t["refused"]] == [1]
    assert {t["device"] for t in ledger if t["attacked"] == "inflate_count"} == {1}
    assert json.loads((tmp_path / "metrics.json").read_text())["replies/refused"] == 1
    fused = load_export(tmp_path / "rounds/round_001/fusion/co_submodel.pt")
    honest = [load_export(tmp_path / f"rounds/round_001/device_{d:03d}/co_submodel.pt").sample_count
              for d in (0, 2, 3)]
    cloud = load_export(tmp_path / "rounds/round_001/cloud_round/co_submodel.pt").sample_count
    assert fused.sample_count == cloud + sum(honest)  # the lie is not counted
