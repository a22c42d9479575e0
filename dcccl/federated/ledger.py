"""The device/cloud ledger: every transfer between the cloud and a device, in bytes.

By construction only the control model and the co-submodel go down, and only a co-submodel copy, its sample count,
(for class-aware fusion) its samples per class and (with DP-SGD) the epsilon it has spent go up; recording anything
else raises :class:`LedgerViolation`, so a misconfigured stage is refused before it runs. With compressed transfers
each copy is counted in the bytes its encoding took.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.exports import load_export
from dcccl.errors import DCCCLError
from dcccl.federated.costs import state_dict_bytes

Direction = Literal["down", "up"]
ALLOWED: dict[str, frozenset[str]] = {
    "down": frozenset({"control_model", "co_submodel"}),
    "up": frozenset({"co_submodel", "sample_count", "class_counts", "epsilon"}),
}
SAMPLE_COUNT_BYTES = 8  # one int64
EPSILON_BYTES = 8  # one float64


class LedgerViolation(DCCCLError):
    """Something other than the control model or the co-submodel would cross the device/cloud boundary."""


@dataclass(frozen=True)
class Transfer:
    """One transfer: in which round, to or from which device, what, how many bytes, from which file (and for a
    reported figure such as the epsilon, its value; for a copy the cloud refused to fuse, why; for a device a simulated
    attack made lie, the attack's kind)."""

    round: int
    device: int
    direction: Direction
    what: str
    bytes: int
    file: str
    value: Optional[float] = None
    refused: Optional[str] = None
    attacked: Optional[str] = None


class Ledger:
    """Records transfers and adds them up."""

    def __init__(self) -> None:
        self.transfers: list[Transfer] = []
        # path -> (role, bytes, classes whose counts it records): each export is read once
        self._described: dict[str, tuple[str, int, int]] = {}

    def _describe(self, path: str | Path) -> tuple[str, int, int]:
        key = str(path)
        if key not in self._described:
            export = load_export(path)
            self._described[key] = (export.role, state_dict_bytes(export.state_dict), len(export.class_counts or []))
        return self._described[key]

    def check(self, device: int, direction: Direction, path: str | Path) -> tuple[str, int]:
        """The role and size of an export, if it may go ``direction``; else :class:`LedgerViolation`."""
        role, size, _ = self._describe(path)
        if role not in ALLOWED[direction]:
            raise LedgerViolation(
                f"refusing to send a {role} {direction} to device {device} ({path}): only "
                f"{' and '.join(sorted(ALLOWED[direction]))} may go {direction}"
            )
        return role, size

    def record_file(self, round_index: int, device: int, direction: Direction, path: str | Path,
                    sent_bytes: Optional[int] = None) -> Transfer:
        """Record sending an export; its role must be allowed in that direction. ``sent_bytes``: what its encoding
        took on the wire (compressed transfers), instead of the export's size."""
        role, size = self.check(device, direction, path)
        transfer = Transfer(round_index, device, direction, role, size if sent_bytes is None else sent_bytes, str(path))
        self.transfers.append(transfer)
        return transfer

    def record_refused(self, round_index: int, device: int, path: str | Path, reason: str) -> Transfer:
        """Record a copy a device sent up that the cloud refused to fuse (counted in the file's bytes: it may not
        even be an export)."""
        transfer = Transfer(round_index, device, "up", "co_submodel", Path(path).stat().st_size, str(path),
                            refused=reason)
        self.transfers.append(transfer)
        return transfer

    def record_sample_count(self, round_index: int, device: int) -> Transfer:
        """Record a device reporting its sample count."""
        transfer = Transfer(round_index, device, "up", "sample_count", SAMPLE_COUNT_BYTES, "")
        self.transfers.append(transfer)
        return transfer

    def record_class_counts(self, round_index: int, device: int, path: str | Path) -> Transfer:
        """Record a device reporting its samples per class (one int64 per class), as its copy at ``path`` holds."""
        _, _, classes = self._describe(path)
        transfer = Transfer(round_index, device, "up", "class_counts", SAMPLE_COUNT_BYTES * classes, "")
        self.transfers.append(transfer)
        return transfer

    def record_epsilon(self, round_index: int, device: int, epsilon: float) -> Transfer:
        """Record a device reporting the epsilon it has spent so far (DP-SGD)."""
        transfer = Transfer(round_index, device, "up", "epsilon", EPSILON_BYTES, "", epsilon)
        self.transfers.append(transfer)
        return transfer

    def totals(self) -> dict[str, Any]:
        """Uplink and downlink bytes overall and per round."""
        per_round: dict[int, dict[str, int]] = {}
        for t in self.transfers:
            entry = per_round.setdefault(t.round, {"downlink_bytes": 0, "uplink_bytes": 0})
            entry["downlink_bytes" if t.direction == "down" else "uplink_bytes"] += t.bytes
        return {
            "downlink_bytes": sum(t.bytes for t in self.transfers if t.direction == "down"),
            "uplink_bytes": sum(t.bytes for t in self.transfers if t.direction == "up"),
            "per_round": {str(r): per_round[r] for r in sorted(per_round)},
        }

    def save(self, path: str | Path) -> None:
        """Write every transfer and the totals as JSON."""
        atomic_write_json(path, {"transfers": [asdict(t) for t in self.transfers], "totals": self.totals()})
