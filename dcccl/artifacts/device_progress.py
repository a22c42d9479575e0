"""Which devices of a device stage have finished: one record per device, written after its copy.

A device stage killed midway resumes without training again the devices whose record names the bytes of the copy
they left (the coordinator removes the records when the stage starts with another config or is forced). A record
holds the device's report in its JSON form (:class:`~dcccl.federated.device_report.DeviceReport`, which writes and
reads it); here it is plain JSON with the copy's name and SHA-256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.manifest import sha256_of
from dcccl.artifacts.run_dir import RunDirectory


def device_record(work_dir: Path, device: int) -> Path:
    """Where ``device``'s record is kept in the stage's folder."""
    return RunDirectory.stage_progress(work_dir) / f"device_{device:06d}.json"


def record_finished(work_dir: Path, device: int, copy: Path, details: dict[str, Any]) -> dict[str, Any]:
    """Record that ``device`` wrote ``copy`` (call after the copy is written); returns the record."""
    record = {"device": device, "copy": str(copy), "copy_sha256": sha256_of(copy), **details}
    atomic_write_json(device_record(work_dir, device), record)
    return record


def is_finished(work_dir: Path, device: int, copy: Path) -> bool:
    """Whether ``device``'s record exists and names the bytes ``copy`` holds now."""
    record = device_record(work_dir, device)
    return record.is_file() and copy.is_file() and json.loads(record.read_text()).get("copy_sha256") == sha256_of(copy)


def finished_records(work_dir: Path, devices: list[int]) -> list[dict[str, Any]]:
    """The records of those of ``devices`` that have one, in that order."""
    paths = [device_record(work_dir, device) for device in devices]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]
