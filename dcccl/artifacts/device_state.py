"""What a device keeps from one round it takes part in to the next: its privacy accountant's history and its
compression residual. The state never crosses the boundary; each round writes its own file (a re-run round reads the
same state as the first time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from dcccl.artifacts.atomic import atomic_torch_save


def load_device_state(path: Optional[Path]) -> dict[str, Any]:
    """The state a device kept at ``path`` (empty: no path, its first round)."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"the device state {path} of an earlier round is missing (its round must run first)")
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def save_device_state(state: dict[str, Any], path: Path) -> None:
    """Keep ``state`` at ``path`` (written whole or not at all)."""
    atomic_torch_save(state, path)
