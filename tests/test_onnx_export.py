"""The ONNX bundle: parity with PyTorch on real test samples, dynamic batch, the bundle description."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from datamodules.mnist import BundledMNISTDataModule
from dcccl.deploy.bundle import export_bundle


def write_run(run: Path, export_factory: Callable[..., Path]) -> Path:
    """A run directory holding tiny exports of every role, with two rounds of fused co-submodels."""
    for role, relative in (("cloud_submodel", "cloud/cloud_submodel.pt"), ("control_model", "distill/control_model.pt"),
                           ("co_submodel", "rounds/round_001/fusion/co_submodel.pt"),
                           ("co_submodel", "rounds/round_002/fusion/co_submodel.pt")):
        (run / relative).parent.mkdir(parents=True, exist_ok=True)
        export_factory(role, name=relative.replace("/", "_"), seed=len(relative)).rename(run / relative)
    return run


def digit_samples(count: int) -> tuple[torch.Tensor, BundledMNISTDataModule]:
    """The first ``count`` test digits of the bundled data (normalised) and their DataModule."""
    data = BundledMNISTDataModule()
    test = data.test_dataset()
    return torch.stack([test[i][0] for i in range(count)]), data  # type: ignore[index]


def test_bundle_of_a_run_passes_parity_with_a_dynamic_batch(tmp_path: Path,
                                                            export_factory: Callable[..., Path]) -> None:
    run = write_run(tmp_path / "run", export_factory)
    images, data = digit_samples(64)
    bundle = export_bundle(run, tmp_path / "onnx", images, data.input_description())
    assert bundle["format"] == "onnx"
    assert set(bundle["files"]) == {"control_model", "co_submodel", "served_model"}
    assert bundle["on_device"] == ["control_model", "co_submodel"]
    for check in bundle["parity"].values():
        assert check["passed"] and check["samples"] == 64 and check["max_abs_logit_diff"] <= 1e-4
        assert check["runtime"] == "onnxruntime"
    written = json.loads((tmp_path / "onnx/bundle.json").read_text())
    assert written["input"]["shape"] == [1, 28, 28] and written["input"]["class_names"][9] == "9"
    assert written["input"]["mean"] == [0.1307] and written["input"]["std"] == [0.3081]
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx/served_model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        logits = session.run(["logits"], {"images": images[:batch].numpy()})[0]
        assert logits.shape == (batch, 10) and np.isfinite(logits).all()
