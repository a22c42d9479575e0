"""Every device reply is checked before the cloud fuses it: a copy of another network, non-finite weights and
implausible counts are refused with their reason, the round goes on with the others, and a re-run decides alike. A
device's report reads back as it was written (record and wire), and a value of the wrong type is refused by name."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dcccl.artifacts.exports import NetworkExport, load_export, save_export
from dcccl.artifacts.manifest import sha256_of
from dcccl.errors import ConfigError
from dcccl.federated.aggregation import FedAvg
from dcccl.federated.device_report import DeviceReport, MalformedReport, PrivacySpent, finished_reports, record_report
from dcccl.federated.replies import count_problems, reply_problems, weight_problems
from dcccl.pipeline.fusion import FusionStep, fuse_exports
from tests.conftest import TINY


def export_of(seed: int, sample_count: int | None = 10, class_counts: list[int] | None = None) -> NetworkExport:
    torch.manual_seed(seed)
    return NetworkExport.of(TINY.build(10, 1), "co_submodel", TINY, 10, 1, sample_count, class_counts)


def test_a_trained_copy_of_what_was_sent_is_accepted() -> None:
    sent, reply = export_of(0, None), export_of(1, 12, [0] * 7 + [4, 4, 4])
    assert reply_problems(reply, sent, max_samples=12) == []


def test_each_lie_about_the_weights_is_named() -> None:
    sent = export_of(0).state_dict
    key = next(k for k, v in sent.items() if v.is_floating_point() and v.dim() > 1)
    other = dict(sent)
    del other[key]
    assert weight_problems(other, sent) == [f"it lacks 1 of the co-submodel's tensors ({key}, ...)"]
    assert weight_problems({**sent, "extra": torch.zeros(1)}, sent) == [
        "it carries 1 tensors the co-submodel does not have (extra, ...)"]
    reshaped = {**sent, key: torch.zeros(3, 3)}
    assert weight_problems(reshaped, sent) == [
        f"{key} has shape (3, 3) where the co-submodel's is ({', '.join(map(str, sent[key].shape))})"]
    assert weight_problems({**sent, key: sent[key].double()}, sent) == [
        f"{key} is torch.float64 where the co-submodel's is torch.float32"]
    poisoned = sent[key].clone()
    poisoned.view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    assert weight_problems({**sent, key: poisoned}, sent) == [f"{key} holds 2 NaN or infinite values"]
    assert weight_problems({**sent, key: [1.0]}, sent) == [f"{key} is a list, not a tensor"]


@pytest.mark.parametrize(("count", "per_class", "limit", "problem"), [
    (0, None, None, "it reports 0 samples, and a trained copy needs at least one"),
    (-5, None, None, "it reports -5 samples, and a trained copy needs at least one"),
    (10**9, None, 54, "it reports 1,000,000,000 samples but the device holds 54"),
    (None, None, None, "its sample count is None, not a whole number"),
    (True, None, None, "its sample count is True, not a whole number"),
    (3.0, None, None, "its sample count is 3.0, not a whole number"),
    (12, [0] * 7 + [4, 4, 5], None, "its samples per class add up to 13, not to the 12 it reports"),
    (12, [12], None, "its samples per class are not 10 whole numbers of at least zero"),
    (12, [0] * 7 + [16, -8, 4], None, "its samples per class are not 10 whole numbers of at least zero"),
])
def test_each_implausible_count_is_named(count: object, per_class: list[int] | None, limit: int | None,
                                         problem: str) -> None:
    assert count_problems(count, per_class, 10, limit) == [problem]


def test_a_copy_of_another_network_or_role_is_refused() -> None:
    sent = export_of(0)
    wider = replace(TINY, kwargs={"width": 8, "depth": 2})
    other = NetworkExport.of(wider.build(10, 1), "control_model", wider, 10, 1, 10)
    problems = reply_problems(other, sent)
    assert problems[0] == "it holds a control_model, not a copy of the co-submodel"
    assert problems[1].startswith("it is a small_cnn for 10 classes and 1 channels, not the small_cnn")
    assert any("has shape" in problem for problem in problems)


def fusion(tmp_path: Path, copies: list[NetworkExport], shares: tuple[int, ...] = ()) -> FusionStep:
    """A round's fusion of the cloud's copy (seed 100, 40 samples) and ``copies`` (devices 0, 1, ...), all sent
    the export of seed 0."""
    start = save_export(export_of(0, None), tmp_path / "start.pt")
    cloud = save_export(export_of(100, 40), tmp_path / "cloud.pt")
    paths = tuple(save_export(copy, tmp_path / f"device_{i}.pt") for i, copy in enumerate(copies))
    outputs = (tmp_path / "fused.pt", tmp_path / "replies.json")
    return FusionStep(label="fusion", restart_point="rounds", outputs=outputs, inputs=(),
                      round_index=1, rule=FedAvg(), cloud_copy=cloud, device_copies=paths,
                      device_bases=(None,) * len(paths), device_ids=tuple(range(len(paths))),
                      device_rounds=(1,) * len(paths), device_starts=(start,) * len(paths),
                      reply_verdicts=tmp_path / "replies.json", device_shares=shares)


def test_a_refused_copy_is_left_out_of_the_fusion_and_its_reason_written(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    honest = [export_of(1, 10), export_of(2, 30)]
    poisoned = export_of(3, 10)
    poisoned.state_dict[next(iter(poisoned.state_dict))].fill_(float("nan"))
    inflated = export_of(4, 10**9)
    step = fusion(tmp_path, [honest[0], poisoned, honest[1], inflated], shares=(10, 10, 30, 12))
    step.run()
    verdicts = json.loads((tmp_path / "replies.json").read_text())["replies"]
    assert [v["accepted"] for v in verdicts] == [True, False, True, False]
    assert "NaN or infinite" in verdicts[1]["reason"]
    assert verdicts[3]["reason"] == "it reports 1,000,000,000 samples but the device holds 12"
    assert "refused device 3's copy of round 1: it reports 1,000,000,000 samples" in caplog.text
    # What is fused is exactly the fusion of the cloud's copy and the two honest ones.
    (tmp_path / "honest").mkdir()
    expected, _ = fuse_exports(fusion(tmp_path / "honest", honest))
    fused = load_export(tmp_path / "fused.pt")
    assert fused.sample_count == 40 + 10 + 30
    for key, value in expected.state_dict.items():
        assert torch.equal(fused.state_dict[key], value), key
    # The decision reads the files alone: run again, it is the same.
    step.run()
    assert json.loads((tmp_path / "replies.json").read_text())["replies"] == verdicts


def test_an_unreadable_reply_is_refused_not_a_crash(tmp_path: Path) -> None:
    step = fusion(tmp_path, [export_of(1, 10), export_of(2, 10)])
    step.device_copies[1].write_bytes(b"not an export")
    verdicts = step.check_replies()
    assert [v.accepted for v in verdicts] == [True, False]
    assert verdicts[1].reason.startswith("it is not a readable export")


def test_a_device_s_limit_is_its_share_capped_by_the_fleet_s_max_device_samples() -> None:
    from dcccl.federated.fleet import FleetSpec

    assert FleetSpec(num_devices=3).share_limits([5, 40, 7]) == (5, 40, 7)  # a simulated fleet: the partition
    assert FleetSpec(num_devices=3, max_device_samples=10).share_limits([5, 40, 7]) == (5, 10, 7)
    # A cloud that does not hold the devices' data (a real fleet): the config's limit, or none at all.
    assert FleetSpec(num_devices=2, max_device_samples=10).share_limits([]) == (10, 10)
    assert FleetSpec(num_devices=2).share_limits([]) == ()
    with pytest.raises(ConfigError, match="max_device_samples must be at least 1"):
        FleetSpec(num_devices=2, max_device_samples=0)


# A simulated round's record with DP-SGD and compression, and the Flower cloud's record of a refused reply: the
# progress records' forms that a resumed round and the run's metrics read back.
SIMULATED_RECORD = {"device": 3, "copy": "/run/rounds/round_001/device_003/co_submodel.pt", "copy_sha256": "ab" * 32,
                    "epochs": 3, "steps": 51, "samples": 3240, "last_loss": 0.25, "stopped": "trained its floor",
                    "rank": 0, "privacy": {"epsilon": 1.5, "delta": 1e-05, "noise_multiplier": 1.1,
                                           "sample_rate": 0.0588, "max_grad_norm": 1, "accountant": "rdp"},
                    "wire": {"down_bytes": 1024, "up_bytes": 256}}
FLOWER_RECORD = {"device": 0, "copy": "/run/rounds/round_001/device_000/co_submodel.pt", "copy_sha256": "cd" * 32,
                 "epochs": 1, "steps": 8, "samples": 512, "sample_count": 710, "privacy": {"epsilon": 2.0},
                 "stopped": "trained on its node", "refused": "its sample count is too large"}


@pytest.mark.parametrize("record", [SIMULATED_RECORD, FLOWER_RECORD], ids=["simulated", "flower"])
def test_a_device_report_reads_back_its_record_unchanged(record: dict) -> None:
    report = DeviceReport.from_record(json.loads(json.dumps(record)))
    assert report.to_record() == record
    assert report.privacy is not None and report.privacy.epsilon == record["privacy"]["epsilon"]
    assert report.privacy.max_grad_norm == record["privacy"].get("max_grad_norm")
    assert isinstance(report.privacy.max_grad_norm, (int, type(None)))  # a record's 1 stays 1, not 1.0


def test_a_device_report_crosses_the_wire_and_its_recorded_file_unchanged(tmp_path: Path) -> None:
    sent = DeviceReport(4, 2, 30, 480, "trained on its node", sample_count=240, class_counts=(0,) * 7 + (80,) * 3,
                        privacy=PrivacySpent(0.75))
    wire = sent.to_wire()
    assert wire == {"sample-count": 240, "epochs": 2, "steps": 30, "samples": 480, "epsilon": 0.75,
                    "class-counts": [0] * 7 + [80] * 3}
    assert DeviceReport.from_wire(4, wire, "trained on its node") == sent
    copy = save_export(export_of(1, 240), tmp_path / "copy.pt")
    recorded = record_report(tmp_path, copy, sent)
    assert recorded == replace(sent, copy=str(copy), copy_sha256=sha256_of(copy))
    assert finished_reports(tmp_path, [4, 5]) == [recorded]  # device 5 has no record
    stale = replace(recorded, copy="elsewhere.pt", copy_sha256="0" * 64)  # recording names the copy it is given
    assert record_report(tmp_path, copy, stale) == recorded


@pytest.mark.parametrize(("change", "problem"), [
    ({"sample-count": 2.5}, "its sample-count is 2.5, not a whole number"),
    ({"sample-count": True}, "its sample-count is True, not a whole number"),
    ({"epochs": "3"}, "its epochs is '3', not a whole number"),
    ({"steps": None}, "its steps is None, not a whole number"),
    ({"samples": [512]}, "its samples is [512], not a whole number"),
    ({"class-counts": [1, 2.0]}, "its class-counts hold 2.0, not a whole number"),
    ({"class-counts": 3}, "its class-counts is 3, not a list of whole numbers"),
    ({"epsilon": "0.5"}, "its epsilon is '0.5', not a number"),
], ids=lambda value: str(value))
def test_a_malformed_report_is_refused_naming_the_value(change: dict, problem: str) -> None:
    honest = {"sample-count": 12, "epochs": 1, "steps": 3, "samples": 36}
    with pytest.raises(MalformedReport, match="^device 2's report is malformed: " + re.escape(problem) + "$"):
        DeviceReport.from_wire(2, {**honest, **change})
    with pytest.raises(MalformedReport, match="it gives no samples"):
        DeviceReport.from_wire(2, {key: value for key, value in honest.items() if key != "samples"})
    with pytest.raises(MalformedReport, match="its counts is 'lots', not a mapping"):
        DeviceReport.from_wire(2, "lots")


@pytest.mark.parametrize(("change", "problem"), [
    ({"privacy": {"epsilon": "x"}}, "its epsilon is 'x', not a number"),
    ({"privacy": {"delta": 1e-5}}, "it gives no epsilon"),
    ({"privacy": {"epsilon": 1.0, "accountant": 3}}, "its accountant is 3, not text"),
    ({"wire": {"down_bytes": 1.5, "up_bytes": 2}}, "its down_bytes is 1.5, not a whole number"),
    ({"wire": [1, 2]}, "its wire is [1, 2], not a mapping"),
    ({"rank": "0"}, "its rank is '0', not a whole number"),
    ({"stopped": 7}, "its stopped is 7, not text"),
    ({"device": 1.0}, "its device is 1.0, not a whole number"),
], ids=lambda value: str(value))
def test_a_malformed_record_is_refused_naming_the_value(change: dict, problem: str) -> None:
    with pytest.raises(MalformedReport, match="^" + re.escape(problem) + "$"):
        DeviceReport.from_record({**SIMULATED_RECORD, **change})
