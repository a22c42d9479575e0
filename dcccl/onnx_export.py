"""The on-device bundle as ONNX: control model, co-submodel and the served model, checked against PyTorch.

Mobile runtimes (MNN, TFLite, Core ML) start from ONNX. Every exported graph has a dynamic batch dimension
and is checked with onnxruntime on real test samples: maximum absolute logit difference and top-1 agreement.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dcccl.atomic import atomic_write_json
from dcccl.exports import load_network
from dcccl.run_dir import RunDirectory
from dcccl.summed import SummedLogits

PARITY_TOLERANCE = 1e-4


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


def check_parity(network: nn.Module, path: Path, images: torch.Tensor) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime on ``images`` and compare with PyTorch's logits."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        torch_logits = network.eval()(images).numpy()
    max_diff = float(np.abs(onnx_logits - torch_logits).max())
    same_top1 = bool((onnx_logits.argmax(1) == torch_logits.argmax(1)).all())
    return {"samples": int(images.shape[0]), "max_abs_logit_diff": max_diff, "same_top1": same_top1,
            "passed": max_diff <= PARITY_TOLERANCE and same_top1}


def last_fused_co_submodel(run: RunDirectory) -> Path:
    """The fused co-submodel of the last finished round."""
    fused = sorted(run.root.glob("rounds/round_*/fusion/co_submodel.pt"))
    if not fused:
        raise FileNotFoundError(f"no fused co-submodel in {run.root}: run the pipeline first")
    return fused[-1]


def export_bundle(run_dir: Path, out_dir: Path, images: torch.Tensor, description: dict[str, Any]) -> dict[str, Any]:
    """Export the control model and the co-submodel (on-device) and the served model (cloud) as ONNX.

    Args:
        run_dir: A pipeline run directory.
        out_dir: Where to write ``control_model.onnx``, ``co_submodel.onnx``, ``served_model.onnx`` and
            ``bundle.json`` (inputs, normalisation, class names, parity results).
        images: Real test samples for the parity check (normalised as the models expect).
        description: Input shape, normalisation and class names of the data.
    """
    run = RunDirectory(run_dir)
    co = load_network(last_fused_co_submodel(run), "co_submodel")
    networks = {
        "control_model": load_network(run.control_model, "control_model"),
        "co_submodel": co,
        "served_model": SummedLogits(load_network(run.cloud_submodel, "cloud_submodel"), co),
    }
    files, parity = {}, {}
    for name, network in networks.items():
        path = export_onnx(network, out_dir / f"{name}.onnx", images[:2])
        files[name] = path.name
        parity[name] = check_parity(network, path, images)
    bundle = {
        "files": files,
        "input": {"name": "images", "layout": "NCHW", "batch": "dynamic", **description},
        "output": {"name": "logits", "note": "served logits = cloud submodel + co-submodel"},
        "on_device": ["control_model", "co_submodel"],
        "parity": parity,
    }
    atomic_write_json(out_dir / "bundle.json", bundle)
    return bundle
