"""Exports as Flower records and back: what crosses the wire, and how many bytes of it are model weights.

A network crosses as an ``ArrayRecord`` (its state dict) and a ``ConfigRecord`` describing it (role, backbone,
classes, channels), so the receiver can refuse it by role before reading the weights.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from dcccl.errors import DCCCLError

if TYPE_CHECKING:  # torch and timm: imported by the functions that build networks, not by a device's queries
    from dcccl.artifacts.exports import NetworkExport


class RefusedMessage(DCCCLError):
    """A message carries something a device must never receive (the cloud submodel, an unknown record)."""


def describe_network(export: NetworkExport) -> ConfigRecord:
    """What a receiver needs to rebuild ``export``'s network around its weights (and to check its role)."""
    return ConfigRecord({"role": export.role, "backbone": json.dumps(export.backbone.to_dict()),
                         "num_classes": export.num_classes, "in_chans": export.in_chans})


def weights_record(export: NetworkExport) -> ArrayRecord:
    """The export's state dict as an ``ArrayRecord``."""
    return ArrayRecord({key: value.detach().cpu().contiguous() for key, value in export.state_dict.items()})


def network_from(description: ConfigRecord, weights: ArrayRecord, sample_count: Optional[int] = None,
                 class_counts: Optional[list[int]] = None) -> NetworkExport:
    """The export a description and its weights make."""
    from dcccl.artifacts.exports import NetworkExport
    from dcccl.backbones.spec import BackboneSpec

    backbone = BackboneSpec.from_dict(json.loads(str(description["backbone"])))
    return NetworkExport(str(description["role"]), backbone, int(description["num_classes"]),  # type: ignore[arg-type]
                         int(description["in_chans"]), weights.to_torch_state_dict(), sample_count, class_counts)


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the tensors in a message's array records (what the ledger counts for the networks it carries)."""
    return sum(array.numpy().nbytes for record in content.array_records.values() for array in record.values())


def check_received(content: RecordDict, allowed: dict[str, set[str]]) -> None:
    """Refuse a message unless each of its records is one the device expects, each network of an allowed role.

    Args:
        content: The message's records.
        allowed: Record name -> the roles a network under that name may have (empty: not a network).

    Raises:
        RefusedMessage: Naming the record and what it carries.
    """
    for name in content.keys():
        if name not in allowed:
            raise RefusedMessage(f"refusing a message with the unexpected record {name!r}: a device receives only "
                                 "the control model, the co-submodel and its training settings")
    for name, record in content.config_records.items():
        role = record.get("role")
        if role is not None and role not in allowed[name]:
            raise RefusedMessage(f"refusing a message that carries a {role} as {name!r}: a device receives only "
                                 f"{' or '.join(sorted(allowed[name])) or 'no network'} there, never the cloud "
                                 "submodel")
