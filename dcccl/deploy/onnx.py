"""ONNX writer and runner of the on-device bundle (:mod:`dcccl.deploy.bundle`).

Mobile runtimes (MNN, TFLite, Core ML) start from ONNX. Graphs have input ``images`` and output ``logits``, batch
dynamic; onnxruntime runs them for the parity check.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn


def export_onnx(network: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Write ``network`` (eval mode) as ONNX with input ``images`` and output ``logits``, batch dynamic."""
    network.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # written whole, then renamed into place
        staged = Path(tmp) / path.name
        torch.onnx.export(network, (example,), str(staged), dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
        os.replace(staged, path)
    return path


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    """Logits of the ONNX file at ``path`` on ``images``, computed by onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"images": images.numpy()})[0])
