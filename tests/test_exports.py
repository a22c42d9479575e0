"""Tests of dcccl.artifacts.exports (self-describing network exports) and dcccl.artifacts.atomic (atomic writes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dcccl.artifacts.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from dcccl.artifacts.exports import (
    EXPORT_FORMAT,
    ROLES,
    ExportError,
    NetworkExport,
    load_export,
    load_network,
    save_export,
)
from dcccl.backbones import BackboneSpec, SmallCNN

SPEC = BackboneSpec(name="small_cnn", kwargs={"width": 4, "depth": 2})


def _trained_like_network(seed: int = 0) -> SmallCNN:
    """A small network whose weights and batch-norm buffers differ from a fresh initialisation."""
    torch.manual_seed(seed)
    network = SmallCNN(num_classes=10, in_chans=1, width=4, depth=2)
    network.train()
    with torch.no_grad():
        network(torch.randn(8, 1, 28, 28))  # moves the running statistics away from 0 and 1
    return network.eval()


def _files(folder: Path) -> list[str]:
    """Names of every entry in ``folder``, hidden ones included."""
    return sorted(entry.name for entry in folder.iterdir())


def test_roles() -> None:
    assert ROLES == ("cloud_submodel", "control_model", "co_submodel")


def test_export_round_trip(tmp_path: Path) -> None:
    network = _trained_like_network()
    export = NetworkExport.of(network, "co_submodel", SPEC, num_classes=10, in_chans=1, sample_count=1200)
    path = save_export(export, tmp_path / "exports" / "co.pt")  # the parent folder is created
    assert path == tmp_path / "exports" / "co.pt"
    loaded = load_export(path, role="co_submodel")
    assert loaded.role == "co_submodel"
    assert loaded.backbone == SPEC
    assert (loaded.num_classes, loaded.in_chans, loaded.sample_count) == (10, 1, 1200)
    assert loaded.state_dict.keys() == network.state_dict().keys()
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict[key], value), key
        assert loaded.state_dict[key].dtype == value.dtype, key
    rebuilt = loaded.build().eval()
    assert isinstance(rebuilt, SmallCNN) and rebuilt.num_features == 8  # width 4, depth 2: 4 -> 8
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), network(x))
    assert _files(tmp_path / "exports") == ["co.pt"]  # no temporary file left behind


def test_export_payload_and_default_sample_count(tmp_path: Path) -> None:
    export = NetworkExport.of(_trained_like_network(), "cloud_submodel", SPEC, num_classes=10, in_chans=1)
    payload = export.payload()
    assert payload["format"] == EXPORT_FORMAT == "dcccl.export/1"
    assert payload["backbone"] == {"name": "small_cnn", "checkpoint_path": None, "kwargs": {"width": 4, "depth": 2},
                                   "pretrained": False, "normalize": False}
    assert payload["sample_count"] is None
    loaded = load_export(save_export(export, tmp_path / "cloud.pt"))  # no role check
    assert loaded.role == "cloud_submodel"
    assert loaded.sample_count is None


def test_export_snapshot_is_a_copy() -> None:
    network = _trained_like_network()
    export = NetworkExport.of(network, "control_model", SPEC, num_classes=10, in_chans=1)
    before = export.state_dict["head.weight"].clone()
    with torch.no_grad():
        network.head.weight.add_(1.0)
    assert torch.equal(export.state_dict["head.weight"], before)


def test_build_ignores_the_spec_checkpoint(tmp_path: Path) -> None:
    """The weights travel in the export: a checkpoint_path in the spec (here a missing file) is not read."""
    network = _trained_like_network()
    spec = BackboneSpec(name="small_cnn", checkpoint_path=str(tmp_path / "gone.pt"), kwargs={"width": 4, "depth": 2})
    export = NetworkExport.of(network, "cloud_submodel", spec, num_classes=10, in_chans=1)
    rebuilt = load_export(save_export(export, tmp_path / "e.pt")).build().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), network(x))


def test_role_mismatch_raises(tmp_path: Path) -> None:
    path = save_export(NetworkExport.of(_trained_like_network(), "cloud_submodel", SPEC, 10, 1), tmp_path / "c.pt")
    with pytest.raises(ExportError, match="holds a cloud_submodel, expected a co_submodel"):
        load_export(path, role="co_submodel")
    with pytest.raises(ExportError, match="expected a control_model"):
        load_network(path, role="control_model")


def test_foreign_torch_file_raises_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(ExportError, match="is not a dcccl export") as info:
        load_export(path)
    assert str(path) in str(info.value)


def test_garbage_bytes_raise_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01 this is not a torch file \xff" * 10)
    with pytest.raises(ExportError, match="is not a readable dcccl export") as info:
        load_export(path)
    assert str(path) in str(info.value)


def test_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pt"
    with pytest.raises(ExportError, match="export not found") as info:
        load_export(path)
    assert str(path) in str(info.value)
    with pytest.raises(ExportError, match="export not found"):
        load_export(tmp_path)  # a folder is not an export file either
    assert issubclass(ExportError, ValueError)


def test_load_network_checks_the_class_count(tmp_path: Path) -> None:
    network = _trained_like_network()
    path = save_export(NetworkExport.of(network, "co_submodel", SPEC, 10, 1, sample_count=5), tmp_path / "co.pt")
    with pytest.raises(ExportError, match="trained for 10 classes but the data has 7"):
        load_network(path, role="co_submodel", num_classes=7)
    rebuilt = load_network(path, role="co_submodel", num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), network(x))


# ---------------------------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_json_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    atomic_write_json(target, {"b": 2, "a": [1, 2.5]})
    assert _files(tmp_path / "sub") == ["report.json"]
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": [1, 2.5], "b": 2}
    assert text.endswith("\n")
    assert text.index('"a"') < text.index('"b"')  # keys sorted
    atomic_write_json(target, {"c": 3})  # overwrite
    assert json.loads(target.read_text(encoding="utf-8")) == {"c": 3}
    assert _files(tmp_path / "sub") == ["report.json"]


def test_atomic_write_text_and_torch_save(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "note.txt", "héllo")
    assert (tmp_path / "note.txt").read_bytes() == "héllo".encode()
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["x"], torch.arange(3))
    assert _files(tmp_path) == ["note.txt", "t.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "note.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # not private like a temporary file


def test_failed_atomic_write_removes_its_temporary_file(tmp_path: Path) -> None:
    blocker = tmp_path / "target"
    blocker.mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        atomic_write_bytes(blocker, b"data")
    assert _files(tmp_path) == ["target"]
    assert _files(blocker) == []


def test_a_key_registered_outside_dcccl_is_recorded_as_a_module_path(tmp_path: Path) -> None:
    from dcccl.backbones.builders import BACKBONES, register_backbone

    @register_backbone(key="exports_test_net")
    def _build(num_classes: int, in_chans: int) -> SmallCNN:
        return SmallCNN(num_classes, in_chans, width=4, depth=1)

    try:
        spec = BackboneSpec("exports_test_net")
        export = NetworkExport.of(spec.build(10, 1), "co_submodel", spec, 10, 1)
        assert export.backbone.name == f"{__name__}:exports_test_net"  # rebuildable in a fresh process
        assert NetworkExport.of(SmallCNN(10, 1), "co_submodel", SPEC, 10, 1).backbone.name == "small_cnn"
    finally:
        BACKBONES.remove("exports_test_net")
