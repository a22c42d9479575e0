"""The ONNX bundle: parity with PyTorch on real test samples, dynamic batch, the bundle description."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from datamodules.mnist import BundledMNISTDataModule
from dcccl.artifacts.exports import load_network
from dcccl.deploy.bundle import export_bundle


def write_run(run: Path, export_factory: Callable[..., Path]) -> Path:
    """A run directory holding tiny exports of every role, with two rounds of fused co-submodels (each its own seed)."""
    for seed, (role, relative) in enumerate((
            ("cloud_submodel", "cloud/cloud_submodel.pt"), ("control_model", "distill/control_model.pt"),
            ("co_submodel", "rounds/round_001/fusion/co_submodel.pt"),
            ("co_submodel", "rounds/round_002/fusion/co_submodel.pt"))):
        (run / relative).parent.mkdir(parents=True, exist_ok=True)
        export_factory(role, name=relative.replace("/", "_"), seed=seed).rename(run / relative)
    return run


def digit_samples(count: int) -> tuple[torch.Tensor, BundledMNISTDataModule]:
    """The first ``count`` test digits of the bundled data (normalised) and their DataModule."""
    data = BundledMNISTDataModule()
    test = data.test_dataset()
    return torch.stack([test[i][0] for i in range(count)]), data  # type: ignore[index]


def matches(onnx_logits: np.ndarray, reference: np.ndarray) -> bool:
    """Same logits within 1e-4 and the same top-1 class on every sample."""
    return bool(np.abs(onnx_logits - reference).max() <= 1e-4 and (onnx_logits.argmax(1) == reference.argmax(1)).all())


def test_bundle_of_a_run_matches_its_exports_in_onnxruntime_with_a_dynamic_batch(
        tmp_path: Path, export_factory: Callable[..., Path]) -> None:
    run = write_run(tmp_path / "run", export_factory)
    images, data = digit_samples(64)
    bundle = export_bundle(run, tmp_path / "onnx", images, data.input_description())
    assert bundle["format"] == "onnx"
    assert bundle["files"] == {name: f"{name}.onnx" for name in ("control_model", "co_submodel", "served_model")}
    assert bundle["on_device"] == ["control_model", "co_submodel"]
    # Checked here, not taken from the bundle's own parity report: each written graph run by onnxruntime on 64 real
    # test digits (the graphs were traced on 2) against the PyTorch networks rebuilt from the run's exports.
    networks = {name: load_network(run / relative, role).eval() for name, role, relative in (
        ("cloud", "cloud_submodel", "cloud/cloud_submodel.pt"),
        ("control", "control_model", "distill/control_model.pt"),
        ("co_1", "co_submodel", "rounds/round_001/fusion/co_submodel.pt"),
        ("co_2", "co_submodel", "rounds/round_002/fusion/co_submodel.pt"))}
    with torch.no_grad():
        logits = {name: network(images).numpy() for name, network in networks.items()}
    references = {"control_model": logits["control"], "co_submodel": logits["co_2"],
                  "served_model": logits["cloud"] + logits["co_2"], "round 1 co_submodel": logits["co_1"]}
    for name, file in bundle["files"].items():
        session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / file), providers=["CPUExecutionProvider"])
        onnx_logits = session.run(["logits"], {"images": images.numpy()})[0]
        assert onnx_logits.shape == (64, 10)
        # It matches its own network and no other: a wrong network (round 1's co-submodel for the last round's, the
        # co-submodel alone for the served model) is told apart by far more than the tolerance.
        assert [other for other, reference in references.items() if matches(onnx_logits, reference)] == [name]
        assert min(np.abs(onnx_logits - reference).max() for other, reference in references.items()
                   if other != name) > 1e-2
        assert bundle["parity"][name]["passed"] and bundle["parity"][name]["samples"] == 64
    written = json.loads((tmp_path / "onnx/bundle.json").read_text())
    assert written["input"]["shape"] == [1, 28, 28] and written["input"]["class_names"][9] == "9"
    assert written["input"]["mean"] == [0.1307] and written["input"]["std"] == [0.3081]
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx/served_model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        logits_of_batch = session.run(["logits"], {"images": images[:batch].numpy()})[0]
        np.testing.assert_allclose(logits_of_batch, references["served_model"][:batch], atol=1e-4)
