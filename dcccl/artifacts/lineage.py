"""Where an export's weights came from, so that the boundary can ask what a network is, not what it is called.

Every export records its lineage: the files its weights started from (nothing: a fresh initialisation; a local
weights file; another dcccl export, by SHA-256 and role), and the SHA-256 of every *cloud-only* export anywhere in
that ancestry, inherited from the exports it started from. A cloud-only export is the cloud submodel, or a network
trained on pooled samples (the centralized baseline). A network sent down (the control model, any co-submodel) must
have no cloud-only export in its lineage.

The lineage follows weights, not knowledge: the control model is distilled from the cloud submodel's outputs and its
weights start from scratch (or a local file), so its lineage is clean; a control model initialised from the cloud
submodel's export is not.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch

from dcccl.artifacts.exports import EXPORT_FORMAT
from dcccl.artifacts.manifest import sha256_of

_READ: dict[tuple[str, str], dict[str, Any]] = {}  # (path, SHA-256) -> what the file says of itself


def described(path: Path) -> dict[str, Any]:
    """A weights file as a lineage entry, with the cloud-only exports it carries (read once per content)."""
    if not path.is_file():  # gone since the network was built from it: named, not vouched for
        return {"entry": {"kind": "weights_file", "path": str(path), "sha256": None}, "cloud_only": []}
    sha = sha256_of(path)
    key = (str(path.absolute()), sha)
    if key not in _READ:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not a dcccl export (a timm or Lightning file): a plain weights file
            payload = None
        if isinstance(payload, dict) and payload.get("format") == EXPORT_FORMAT:
            lineage = payload.get("lineage") or {}
            cloud_only = set(lineage.get("cloud_only", []))
            if is_cloud_only(payload.get("role"), payload.get("trained_on")):
                cloud_only.add(sha)
            _READ[key] = {"entry": {"kind": "export", "role": payload.get("role"), "sha256": sha},
                          "cloud_only": sorted(cloud_only), "lineage": payload.get("lineage")}
        else:
            _READ[key] = {"entry": {"kind": "weights_file", "sha256": sha}, "cloud_only": [], "lineage": None}
    return _READ[key]


def is_cloud_only(role: Optional[str], trained_on: Optional[str]) -> bool:
    """Whether an export with this role, trained on this partition, must stay on the cloud."""
    return role == "cloud_submodel" or trained_on == "pooled"


def lineage_of(starts: Iterable[str | Path], pretrained: bool = False) -> dict[str, Any]:
    """The lineage of weights that started from the files ``starts`` (a fusion: every copy it averaged; none: from
    scratch, or timm's pretrained weights with ``pretrained``)."""
    entries: list[dict[str, Any]] = []
    cloud_only: set[str] = set()
    for start in starts:
        known = described(Path(start))
        entries.append(known["entry"])
        cloud_only.update(known["cloud_only"])
    if not entries:
        entries.append({"kind": "pretrained" if pretrained else "scratch"})
    return {"from": entries, "cloud_only": sorted(cloud_only)}


def recorded_lineages(paths: Iterable[Path]) -> dict[Path, dict[str, Any]]:
    """The lineage each network export among ``paths`` records (other files are left out)."""
    found = {}
    for path in paths:
        if path.suffix == ".pt" and path.is_file():
            lineage = described(path)["lineage"]
            if lineage is not None:
                found[path] = lineage
    return found


def cloud_only_ancestors(lineage: Optional[dict[str, Any]]) -> list[str]:
    """The SHA-256 of every cloud-only export in ``lineage`` (empty for none, or a lineage not recorded)."""
    return list((lineage or {}).get("cloud_only", []))
