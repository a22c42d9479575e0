"""What goes down is never the cloud submodel: not by a config line that starts the control model from its file,
and not as tensors of it inside anything sent down, whatever the file is called."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dcccl.artifacts.exports import NetworkExport, load_export, save_export
from dcccl.pipeline.boundary import BoundaryViolation, DeviceGate
from dcccl.pipeline.downlink import CloudTensors, cloud_side_source, is_constant, tensor_key
from dcccl.pipeline.steps import DeviceTask, StageCall
from tests.conftest import TINY


def test_tensors_are_matched_by_content_and_constant_ones_are_left_out() -> None:
    a = torch.arange(6.0).reshape(2, 3)
    assert tensor_key(a) == tensor_key(a.clone()) != tensor_key(a.reshape(3, 2))
    assert tensor_key(a) != tensor_key(a.double()) and tensor_key(a) != tensor_key(a + 1e-6)
    assert is_constant(torch.ones(4)) and is_constant(torch.zeros(0)) and not is_constant(a)
    cloud = CloudTensors({"conv.weight": a, "bn.weight": torch.ones(3), "bn.bias": torch.zeros(3)})
    sent = {"stem.weight": a.clone(), "bn.weight": torch.ones(3), "head.weight": torch.randn(2, 3)}
    assert cloud.shared_with(sent) == [("stem.weight", "conv.weight")]


def test_a_cloud_side_weights_file_is_named(tmp_path: Path, export_factory) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    (run / "cloud").mkdir(parents=True)
    cloud = export_factory("cloud_submodel")
    inside = shutil.copy(cloud, run / "cloud" / "cloud_submodel.pt")
    assert cloud_side_source(str(inside), run) == f"{inside} is in the run's cloud-side folder {run / 'cloud'}"
    assert "cloud-side folder" in str(cloud_side_source(str(run / "cloud/checkpoints/last.ckpt"), run))
    assert "baselines/centralized" in str(cloud_side_source(str(run / "baselines/centralized/model.pt"), run))
    link = tmp_path / "innocent.pt"
    link.symlink_to(inside)
    assert "cloud-side folder" in str(cloud_side_source(str(link), run))
    assert cloud_side_source(str(cloud), run) == f"{cloud} is a cloud submodel's export"  # any run's
    assert cloud_side_source(str(export_factory("control_model")), run) is None
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    assert cloud_side_source(str(other), run) is None


def _device_call(tmp_path: Path, control: Path, start: Path) -> StageCall:
    task = DeviceTask(0, start, tmp_path / "copy.pt", (control, start), (tmp_path / "copy.pt",))
    return StageCall(label="round 1/1: device 0", restart_point="rounds", outputs=(tmp_path / "copy.pt",),
                     inputs=(control, start), round_index=1, stage="device",
                     model_args={"control_model": str(control), "co_submodel": str(start)}, devices=(task,))


def test_the_gate_refuses_a_control_model_made_of_the_cloud_submodel_s_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cloud_network = TINY.build(10, 1)
    cloud = save_export(NetworkExport.of(cloud_network, "cloud_submodel", TINY, 10, 1), tmp_path / "cloud.pt")
    # The cloud submodel's weights under the control model's role and name (its batch-norm statistics changed).
    disguised = NetworkExport.of(cloud_network, "control_model", TINY, 10, 1)
    for key, value in disguised.state_dict.items():
        if "running" in key:
            value.add_(0.5)
    control = save_export(disguised, tmp_path / "control_model.pt")
    torch.manual_seed(1)
    start = save_export(NetworkExport.of(TINY.build(10, 1), "co_submodel", TINY, 10, 1), tmp_path / "start.pt")
    gate = DeviceGate(cloud_submodel=cloud)
    with pytest.raises(BoundaryViolation, match=r"refusing to send .*control_model.pt down to the devices: \d+ of its "
                                                r"tensors are the cloud submodel's \(.*\)"):
        gate(_device_call(tmp_path, control, start))
    torch.manual_seed(2)
    honest = save_export(NetworkExport.of(TINY.build(10, 1), "control_model", TINY, 10, 1), tmp_path / "honest.pt")
    gate(_device_call(tmp_path, honest, start))  # passes
    assert load_export(honest).role == "control_model"


@pytest.mark.slow
def test_a_config_line_cannot_start_the_control_model_from_the_cloud_submodel(tmp_path: Path) -> None:
    """The bypass of a config line: the control model built from the cloud submodel's file and never trained. It is
    refused before anything runs, in one line, and nothing is written."""
    from tests.commands import dcccl

    run_dir = tmp_path / "run"
    spec = {"name": "small_cnn", "kwargs": {"width": 32}, "checkpoint_path": str(run_dir / "cloud/cloud_submodel.pt")}
    result = dcccl("pipeline", "--config", "configs/quickstart.yaml", "--run_dir", str(run_dir), "--rounds", "1",
                   "--stage_args", json.dumps({"distill": [f"--model.init_args.backbone={json.dumps(spec)}",
                                                           "--model.init_args.optimizer.init_args.lr=0.0"]}))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "sent to the devices" in last and "cloud-side folder" in last and "Traceback" not in result.stderr, last
    assert not run_dir.exists()


def test_a_network_whose_lineage_reaches_the_cloud_submodel_is_never_sent_down(tmp_path: Path) -> None:
    """Trained on after starting from the cloud submodel (so no tensor is the same), renamed, moved out of the run,
    saved under the control model's role: its recorded lineage still names the cloud submodel."""
    from dcccl.artifacts.lineage import cloud_only_ancestors, lineage_of
    from dcccl.artifacts.manifest import sha256_of

    torch.manual_seed(0)
    cloud_network = TINY.build(10, 1)
    cloud = save_export(NetworkExport.of(cloud_network, "cloud_submodel", TINY, 10, 1), tmp_path / "cloud.pt")
    with torch.no_grad():
        for parameter in cloud_network.parameters():
            parameter.add_(0.01)  # "trained" a little: every tensor differs
    child = NetworkExport.of(cloud_network, "control_model", TINY, 10, 1, trained_on="cloud",
                             lineage=lineage_of([cloud]))
    assert child.lineage == {"from": [{"kind": "export", "role": "cloud_submodel", "sha256": sha256_of(cloud)}],
                             "cloud_only": [sha256_of(cloud)]}
    first = save_export(child, tmp_path / "elsewhere" / "control_model.pt")
    # Its grandchild inherits the ancestor, whatever it is called.
    grandchild = save_export(NetworkExport.of(TINY.build(10, 1), "co_submodel", TINY, 10, 1,
                                              lineage=lineage_of([first])), tmp_path / "start.pt")
    assert cloud_only_ancestors(load_export(grandchild).lineage) == [sha256_of(cloud)]
    run = tmp_path / "run"
    assert "descends from a cloud-only export" in str(cloud_side_source(str(first), run))
    assert "descends from a cloud-only export" in str(cloud_side_source(str(grandchild), run))
    torch.manual_seed(2)
    honest = save_export(NetworkExport.of(TINY.build(10, 1), "control_model", TINY, 10, 1,
                                          lineage=lineage_of([])), tmp_path / "honest.pt")
    assert cloud_side_source(str(honest), run) is None
    with pytest.raises(BoundaryViolation, match=r"control_model.pt down to the devices: its weights descend from a "
                                                r"cloud-only export"):
        DeviceGate(cloud_submodel=cloud)(_device_call(tmp_path, first, honest))
    with pytest.raises(BoundaryViolation, match="start.pt down to the devices: its weights descend"):
        DeviceGate()(_device_call(tmp_path, honest, grandchild))  # also without the cloud submodel at hand
    # A network trained on pooled samples (the centralized baseline) is cloud-only too.
    pooled = save_export(NetworkExport.of(TINY.build(10, 1), "co_submodel", TINY, 10, 1, trained_on="pooled"),
                         tmp_path / "pooled.pt")
    assert lineage_of([pooled])["cloud_only"] == [sha256_of(pooled)]
    assert lineage_of([honest])["cloud_only"] == [] and lineage_of([], pretrained=True)["from"] == [
        {"kind": "pretrained"}]


def test_cloud_round_s_co_backbone_may_not_start_from_the_cloud_submodel_s_file(tmp_path: Path,
                                                                               export_factory) -> None:  # type: ignore[no-untyped-def]
    """Bypass 1b: the co-submodel of round 1 built from the cloud submodel's file (as the control model in 1)."""
    from dcccl.pipeline.boundary import ResolvedStage, check_downlink_sources
    from lightning_modules.cloud_round import CloudCoTrainingModule

    run = tmp_path / "run"
    (run / "cloud").mkdir(parents=True)
    cloud = shutil.copy(export_factory("cloud_submodel"), run / "cloud" / "cloud_submodel.pt")
    config = tmp_path / "cloud_round.yaml"
    config.write_text("model: {}\n")
    call = StageCall(label="round 1/1: cloud round", restart_point="rounds", outputs=(run / "co.pt",), inputs=(),
                     round_index=1, stage="cloud_round", config_files=(config,))
    for spec in ({"name": "small_cnn", "checkpoint_path": str(cloud)},
                 {"name": "small_cnn", "checkpoint_path": str(export_factory("cloud_submodel", name="moved"))}):
        resolved = ResolvedStage(CloudCoTrainingModule, CloudCoTrainingModule, "cloud", {"co_backbone": spec}, {})
        with pytest.raises(BoundaryViolation, match="builds a network that is sent to the devices from a cloud-side"):
            check_downlink_sources(call, resolved, run)
    own = tmp_path / "own.pt"
    torch.save({"w": torch.zeros(2)}, own)
    check_downlink_sources(call, ResolvedStage(CloudCoTrainingModule, CloudCoTrainingModule, "cloud",
                                               {"co_backbone": {"name": "small_cnn", "checkpoint_path": str(own)}},
                                               {}), run)
