"""TorchScript writer and runner of the on-device bundle (:mod:`dcccl.deploy.bundle`).

The networks are traced in eval mode and saved for ``torch.jit.load``, the entry point of PyTorch Mobile and of
the TorchScript route to ExecuTorch. Tracing records the batch size as a symbolic dimension, so a file traced on
two samples runs on any batch; the parity check loads the saved file back and runs it on more samples than that.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcccl.artifacts.atomic import atomic_write_bytes


@contextmanager
def jit_deprecation_silenced() -> Iterator[None]:
    """Silence only the ``FutureWarning`` that ``torch.jit.*`` is deprecated; TorchScript is what we export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def export_torchscript(network: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Trace ``network`` (eval mode) on ``example`` and save it for ``torch.jit.load``, written atomically."""
    network.eval()
    buffer = io.BytesIO()
    with jit_deprecation_silenced(), torch.no_grad():
        torch.jit.save(torch.jit.trace(network, (example,)), buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def run_torchscript(path: Path, images: torch.Tensor) -> np.ndarray:
    """Logits of the TorchScript file at ``path`` on ``images``, loaded back with ``torch.jit.load`` on the CPU."""
    with jit_deprecation_silenced():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module.eval()(images).numpy()
