"""The on-device bundle of a run, in any export format: control model, co-submodel and served model, plus bundle.json.

A format is a writer (network to file, batch dimension dynamic) and a runner (file and images to logits in the
format's own runtime). Everything else is shared: which networks go in, the parity check against PyTorch on real
test samples (maximum absolute logit difference and top-1 agreement) and the bundle description.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.exports import load_network
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.deploy.onnx import export_onnx, run_onnx
from dcccl.deploy.torchscript import export_torchscript, run_torchscript
from dcccl.model.served import SummedLogits

PARITY_TOLERANCE = 1e-4
TRACE_BATCH = 2  # graphs are written from this many samples; parity runs on all of them, so the batch is dynamic


@dataclass(frozen=True)
class BundleFormat:
    """How one export format writes a network and runs the written file.

    Args:
        suffix: File name suffix of the written networks.
        write: ``write(network, path, example)`` writes ``network`` (eval mode) to ``path`` and returns it.
        run: ``run(path, images)`` returns the logits of the written file as a NumPy array.
        runtime: What runs the file in the parity check (reported in bundle.json).
    """

    suffix: str
    write: Callable[[nn.Module, Path, torch.Tensor], Path]
    run: Callable[[Path, torch.Tensor], np.ndarray]
    runtime: str


FORMATS: dict[str, BundleFormat] = {
    "onnx": BundleFormat(".onnx", export_onnx, run_onnx, "onnxruntime"),
    "torchscript": BundleFormat(".pt", export_torchscript, run_torchscript, "torch.jit.load"),
}


def compare_logits(exported: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Parity of an exported network's logits with PyTorch's: max absolute difference and top-1 agreement."""
    max_diff = float(np.abs(exported - reference).max())
    same_top1 = bool((exported.argmax(1) == reference.argmax(1)).all())
    return {"samples": int(reference.shape[0]), "max_abs_logit_diff": max_diff, "same_top1": same_top1,
            "passed": max_diff <= PARITY_TOLERANCE and same_top1}


def check_parity(network: nn.Module, path: Path, images: torch.Tensor, bundle_format: BundleFormat) -> dict[str, Any]:
    """Run the written file on ``images`` in its runtime and compare with the PyTorch network's logits."""
    with torch.no_grad():
        reference = network.eval()(images).numpy()
    return compare_logits(bundle_format.run(path, images), reference)


def last_fused_co_submodel(run: RunDirectory) -> Path:
    """The fused co-submodel of the last finished round."""
    fused = sorted(run.root.glob("rounds/round_*/fusion/co_submodel.pt"))
    if not fused:
        raise FileNotFoundError(f"no fused co-submodel in {run.root}: run the pipeline first")
    return fused[-1]


def bundle_networks(run: RunDirectory) -> dict[str, nn.Module]:
    """The control model and the last fused co-submodel (on-device) and the served cloud + co model."""
    co = load_network(last_fused_co_submodel(run), "co_submodel")
    return {
        "control_model": load_network(run.control_model, "control_model"),
        "co_submodel": co,
        "served_model": SummedLogits(load_network(run.cloud_submodel, "cloud_submodel"), co),
    }


def export_bundle(run_dir: Path, out_dir: Path, images: torch.Tensor, description: dict[str, Any],
                  format: str = "onnx") -> dict[str, Any]:
    """Export the control model and the co-submodel (on-device) and the served model (cloud) in one format.

    Args:
        run_dir: A pipeline run directory.
        out_dir: Where to write ``control_model``, ``co_submodel`` and ``served_model`` (suffix of the format) and
            ``bundle.json`` (format, inputs, normalisation, class names, parity results).
        images: Real test samples for the parity check (normalised as the models expect); use more than
            ``TRACE_BATCH`` so that the check also exercises the dynamic batch dimension.
        description: Input shape, normalisation and class names of the data.
        format: One of ``FORMATS``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {sorted(FORMATS)}")
    bundle_format = FORMATS[format]
    files, parity = {}, {}
    for name, network in bundle_networks(RunDirectory(run_dir)).items():
        path = bundle_format.write(network, out_dir / f"{name}{bundle_format.suffix}", images[:TRACE_BATCH])
        files[name] = path.name
        parity[name] = {**check_parity(network, path, images, bundle_format), "runtime": bundle_format.runtime}
    bundle = {
        "format": format,
        "files": files,
        "input": {"name": "images", "layout": "NCHW", "batch": "dynamic", **description},
        "output": {"name": "logits", "note": "served logits = cloud submodel + co-submodel"},
        "on_device": ["control_model", "co_submodel"],
        "parity": parity,
    }
    atomic_write_json(out_dir / "bundle.json", bundle)
    return bundle


def export_run(run_dir: Path, out_dir: Path, test: Dataset, description: dict[str, Any], format: str = "onnx",
               samples: int = 256) -> dict[str, Any]:
    """:func:`export_bundle` with the first ``samples`` test samples as the parity check's images."""
    images = torch.stack([test[i][0] for i in range(min(samples, len(test)))])  # type: ignore[arg-type]
    return export_bundle(run_dir, out_dir, images, description, format)


def parity_report(bundle: dict[str, Any], out_dir: Path) -> list[str]:
    """One line per exported network: its file and how the parity check went."""
    return [f"{name:>14}: {out_dir / bundle['files'][name]}  parity {'passed' if check['passed'] else 'FAILED'} on "
            f"{check['samples']} test samples with {check['runtime']} (max |logit diff| "
            f"{check['max_abs_logit_diff']:.2e}, same top-1: {check['same_top1']})"
            for name, check in bundle["parity"].items()]
