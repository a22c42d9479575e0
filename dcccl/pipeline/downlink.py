"""What may be sent down: never the cloud submodel's weights, whatever a file is called or whatever role it records.

Two rules, checked on what the artifacts are:

- before anything runs, no network that is sent down (the control model, the co-submodel) may start from a
  cloud-side weights file: the cloud submodel's export, anything else a cloud stage or the centralized baseline
  wrote in the run directory, any dcccl export that records the cloud submodel's role, or any export whose
  lineage (:mod:`dcccl.artifacts.lineage`) reaches a cloud-only export;
- before each device stage, nothing it receives may have a cloud-only export in its lineage, and no tensor of it
  may be one of the cloud submodel's.

A tensor of a downlink (the control model, a co-submodel) identical to one of the cloud submodel's trained tensors,
same shape and same values, means the cloud submodel's weights would leave the cloud: the control model may have
been initialised from it and never trained, or a co-submodel loaded from its file. Constant tensors (a batch norm's
initial scale of ones, a bias of zeros) are left out: every network has them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from dcccl.artifacts.lineage import described

# Folders of a run directory that hold what the cloud trained on its own or on pooled samples.
CLOUD_SIDE_FOLDERS: tuple[str, ...] = ("cloud", "baselines/centralized")


def tensor_key(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    """Dtype, shape and a digest of the values: equal keys mean identical tensors."""
    values = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(values.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return str(values.dtype), tuple(values.shape), digest


def is_constant(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is the same (or it is empty)."""
    flat = tensor.detach().reshape(-1)
    return flat.numel() == 0 or bool((flat == flat[0]).all())


class CloudTensors:
    """The cloud submodel's non-constant tensors, by content.

    Args:
        state_dict: The cloud submodel's weights and buffers.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self._names = {tensor_key(value): name for name, value in state_dict.items()
                       if isinstance(value, torch.Tensor) and not is_constant(value)}

    def shared_with(self, state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
        """``(name in state_dict, name in the cloud submodel)`` of every tensor of ``state_dict`` that is one of the
        cloud submodel's."""
        shared = []
        for name, value in state_dict.items():
            if isinstance(value, torch.Tensor) and not is_constant(value):
                cloud_name = self._names.get(tensor_key(value))
                if cloud_name is not None:
                    shared.append((name, cloud_name))
        return shared


def cloud_side_source(checkpoint_path: str, run_root: Path) -> Optional[str]:
    """Why a downlink network may not start from the weights file ``checkpoint_path`` (``None``: it may).

    Args:
        checkpoint_path: A backbone's weights file.
        run_root: The run directory.
    """
    path = Path(checkpoint_path)
    real = os.path.realpath(path)
    for folder in CLOUD_SIDE_FOLDERS:
        side = os.path.realpath(run_root / folder)
        if real == side or real.startswith(side + os.sep):
            return f"{checkpoint_path} is in the run's cloud-side folder {run_root / folder}"
    known = described(path) if path.is_file() else None  # one read: its role and its lineage
    if known is not None and known["entry"].get("role") == "cloud_submodel":
        return f"{checkpoint_path} is a cloud submodel's export"
    if known is not None and known["cloud_only"]:
        return (f"{checkpoint_path} descends from a cloud-only export (a cloud submodel or a network trained on pooled "
                "samples, in its recorded lineage)")
    return None
