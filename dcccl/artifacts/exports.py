"""Self-describing network exports: the artifacts that stages hand to each other.

An export holds a network's weights together with everything needed to rebuild it (backbone spec,
number of classes, input channels), its role in the method, and for co-submodel copies the number of
samples that trained it (the weight it gets in fusion).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import torch
from torch import nn

from dcccl.artifacts.atomic import atomic_torch_save
from dcccl.backbones.builders import rebuildable_name, torch_load_problem
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import DCCCLError

EXPORT_FORMAT = "dcccl.export/1"
Role = Literal["cloud_submodel", "control_model", "co_submodel"]
ROLES: tuple[str, ...] = get_args(Role)


class ExportError(DCCCLError, ValueError):
    """An export file is missing, unreadable or not what the reader expects."""


@dataclass
class NetworkExport:
    """A network's weights plus the spec to rebuild it.

    Args:
        role: What the network is in DC-CCL.
        backbone: How to build the network (its ``checkpoint_path`` is not used on rebuild: the weights are here).
        num_classes: Number of logits.
        in_chans: Number of input channels.
        state_dict: The weights and buffers.
        sample_count: For a co-submodel copy, the number of training samples behind it.
        class_counts: Those samples per class, when the copy reports them (class-aware fusion).
        trained_on: The samples the stage that wrote it trained on (``cloud``, ``device`` or ``pooled``).
        lineage: Where its weights came from (:mod:`dcccl.artifacts.lineage`); ``None`` where it was not recorded.
    """

    role: Role
    backbone: BackboneSpec
    num_classes: int
    in_chans: int
    state_dict: dict[str, torch.Tensor]
    sample_count: Optional[int] = None
    class_counts: Optional[list[int]] = None
    trained_on: Optional[str] = None
    lineage: Optional[dict[str, Any]] = None

    @classmethod
    def of(cls, network: nn.Module, role: Role, backbone: BackboneSpec, num_classes: int, in_chans: int,
           sample_count: Optional[int] = None, class_counts: Optional[list[int]] = None,
           trained_on: Optional[str] = None, lineage: Optional[dict[str, Any]] = None) -> NetworkExport:
        """Snapshot ``network`` (weights copied to CPU) as an export."""
        state = {key: value.detach().to("cpu", copy=True) for key, value in network.state_dict().items()}
        recorded = replace(backbone, name=rebuildable_name(backbone.name))
        return cls(role, recorded, num_classes, in_chans, state, sample_count, class_counts, trained_on, lineage)

    def build(self) -> nn.Module:
        """Rebuild the network and load the exported weights."""
        network = self.backbone.without_weights().build(self.num_classes, self.in_chans)
        network.load_state_dict(self.state_dict)
        return network

    def payload(self) -> dict[str, Any]:
        """The dict that is written to disk."""
        return {
            "format": EXPORT_FORMAT,
            "role": self.role,
            "backbone": self.backbone.to_dict(),
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "sample_count": self.sample_count,
            "class_counts": self.class_counts,
            "trained_on": self.trained_on,
            "lineage": self.lineage,
            "state_dict": self.state_dict,
        }


def save_export(export: NetworkExport, path: str | Path) -> Path:
    """Write ``export`` to ``path`` atomically."""
    return atomic_torch_save(export.payload(), path)


def load_export(path: str | Path, role: Optional[Role] = None) -> NetworkExport:
    """Read an export, checking its format and (when given) its role.

    Raises:
        ExportError: The file is missing, is not a dcccl export, or holds another role.
    """
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"export not found: {file}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ExportError(f"{file} is not a readable dcccl export ({torch_load_problem(file, err)}): point it at a "
                          ".pt file that a dcccl stage wrote") from err
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{file} is not a dcccl export (expected format {EXPORT_FORMAT!r}): point it at a .pt file "
                          "that a dcccl stage wrote")
    missing = [key for key in ("role", "backbone", "num_classes", "in_chans", "state_dict") if key not in payload]
    if missing:
        raise ExportError(f"{file} is an incomplete dcccl export: missing {', '.join(missing)}")
    if role is not None and payload["role"] != role:
        raise ExportError(f"{file} holds a {payload['role']}, expected a {role}")
    return NetworkExport(
        role=payload["role"],
        backbone=BackboneSpec.from_dict(payload["backbone"]),
        num_classes=int(payload["num_classes"]),
        in_chans=int(payload["in_chans"]),
        state_dict=payload["state_dict"],
        sample_count=payload.get("sample_count"),
        class_counts=payload.get("class_counts"),
        trained_on=payload.get("trained_on"),
        lineage=payload.get("lineage"),
    )


def check_export_fits(path: str | Path, num_classes: int, in_chans: int,
                      advice: str = "every submodel must predict the same classes from the same inputs") -> None:
    """Raise :class:`ExportError` (ending with ``advice``) unless the export at ``path`` predicts ``num_classes``
    classes from ``in_chans`` input channels, as the data has."""
    export = load_export(path)
    if (export.num_classes, export.in_chans) != (num_classes, in_chans):
        raise ExportError(
            f"{path} was trained for {export.num_classes} classes and {export.in_chans} input channels but the data "
            f"has {num_classes} classes and {in_chans} channels: {advice}"
        )


def load_network(path: str | Path, role: Role, num_classes: Optional[int] = None) -> nn.Module:
    """Load an export and rebuild its network, checking the class count when ``num_classes`` is given."""
    export = load_export(path, role)
    if num_classes is not None and export.num_classes != num_classes:
        raise ExportError(
            f"{path} was trained for {export.num_classes} classes but the data has {num_classes}; "
            "every submodel must predict the same classes"
        )
    return export.build()


def check_lightning_checkpoint(path: str | Path, advice: str) -> None:
    """Raise :class:`ExportError` (ending with ``advice``) unless ``path`` holds a Lightning checkpoint."""
    file = Path(path)
    try:
        checkpoint = torch.load(file, map_location="cpu", mmap=zipfile.is_zipfile(file), weights_only=False)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        raise ExportError(f"{file} is not a Lightning checkpoint ({torch_load_problem(file, err)}): {advice}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ExportError(f"{file} is not a Lightning checkpoint (no state_dict in it): {advice}")
