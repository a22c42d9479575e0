"""The TorchScript bundle: saved files load back with torch.jit.load, match PyTorch on real test samples at a batch
size other than the traced one, and ``dcccl export --format torchscript`` reports it."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dcccl.artifacts.run_dir import RunDirectory
from dcccl.commands import export
from dcccl.deploy.bundle import TRACE_BATCH, bundle_networks, export_bundle
from dcccl.deploy.torchscript import jit_deprecation_silenced
from tests.test_onnx_export import digit_samples, write_run

ROOT = Path(__file__).resolve().parent.parent


def test_torchscript_bundle_matches_pytorch_on_test_digits(tmp_path: Path,
                                                           export_factory: Callable[..., Path]) -> None:
    run = write_run(tmp_path / "run", export_factory)
    images, data = digit_samples(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = export_bundle(run, tmp_path / "ts", images, data.input_description(), "torchscript")
    assert not [w for w in caught if "torch.jit" in str(w.message) and "deprecated" in str(w.message)]
    assert bundle["format"] == "torchscript"
    assert bundle["files"] == {"control_model": "control_model.pt", "co_submodel": "co_submodel.pt",
                               "served_model": "served_model.pt"}
    assert bundle["on_device"] == ["control_model", "co_submodel"]
    for check in bundle["parity"].values():  # traced on TRACE_BATCH samples, checked on 64
        assert check["runtime"] == "torch.jit.load" and check["samples"] == 64 > TRACE_BATCH
        assert check["passed"] and check["same_top1"] and check["max_abs_logit_diff"] < 1e-6
    written = json.loads((tmp_path / "ts/bundle.json").read_text())
    assert written == bundle
    assert written["input"]["shape"] == [1, 28, 28] and written["input"]["batch"] == "dynamic"
    assert written["input"]["mean"] == [0.1307] and written["input"]["std"] == [0.3081]


def test_saved_served_model_runs_any_batch_size(tmp_path: Path, export_factory: Callable[..., Path]) -> None:
    run = write_run(tmp_path / "run", export_factory)
    images, data = digit_samples(7)
    export_bundle(run, tmp_path / "ts", images, data.input_description(), "torchscript")
    served = bundle_networks(RunDirectory(run))["served_model"].eval()
    with jit_deprecation_silenced():
        loaded = torch.jit.load(str(tmp_path / "ts/served_model.pt"))
    with torch.no_grad():
        for batch in (1, 3, 7):
            logits = loaded(images[:batch])
            assert logits.shape == (batch, 10)
            torch.testing.assert_close(logits, served(images[:batch]), atol=1e-5, rtol=0)


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"choose one of \['onnx', 'torchscript'\]"):
        export_bundle(tmp_path, tmp_path / "out", torch.zeros(4, 1, 28, 28), {}, "tflite")


def test_cli_exports_torchscript_and_prints_parity(tmp_path: Path, export_factory: Callable[..., Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", export_factory)
    parser = export.pipeline_parser()
    cfg = parser.parse_args(["--config", str(ROOT / "configs/quickstart.yaml"), "--run_dir", str(run)])
    (run / "pipeline.yaml").write_text(parser.dump(cfg, skip_none=False))
    bundle = export.export_main(["--run_dir", str(run), "--format", "torchscript", "--samples", "32"])
    out_dir = run / "export" / "torchscript"
    assert sorted(path.name for path in out_dir.iterdir()) == ["bundle.json", "co_submodel.pt", "control_model.pt",
                                                                "served_model.pt"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line, name in zip(lines, ("control_model", "co_submodel", "served_model")):
        check = bundle["parity"][name]
        assert check["samples"] == 32 and check["passed"]
        assert line == (f"{name:>14}: {out_dir / f'{name}.pt'}  parity passed on 32 test samples with torch.jit.load "
                        f"(max |logit diff| {check['max_abs_logit_diff']:.2e}, same top-1: True)")
