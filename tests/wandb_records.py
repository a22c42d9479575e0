"""Reads W&B offline run files (``run-<id>.wandb``) back, to test what a run logged without any server."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7  # checksum (4 bytes), length (2), record kind (1)
_FULL, _LAST = 1, 4


def _records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The protobuf records of an offline run file (a block-structured log after a 7-byte file header)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + _HEADER])
        if length == 0 and kind == 0:  # zero padding up to the next block
            position += left_in_block
            continue
        pending += data[position + _HEADER:position + _HEADER + length]
        position += _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What one offline W&B run holds: its identity, config, logged history rows and summary."""

    group: str
    job_type: str
    name: str
    project: str
    started: float
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def read_offline_run(run_dir: Path) -> OfflineRun:
    """Read ``<wandb dir>/offline-run-*`` back."""
    (run_file,) = run_dir.glob("run-*.wandb")
    run: OfflineRun | None = None
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for record in _records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = OfflineRun(record.run.run_group, record.run.job_type, record.run.display_name, record.run.project,
                             record.run.start_time.ToNanoseconds() / 1e9)
            config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update if _key(item)})
    assert run is not None, f"{run_file} has no run record"
    run.config, run.history, run.summary = config, history, summary
    return run


def read_offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under a ``wandb/`` folder, in the order they were started."""
    return sorted((read_offline_run(path) for path in wandb_dir.glob("offline-run-*")), key=lambda run: run.started)
