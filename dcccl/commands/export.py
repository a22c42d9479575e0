"""``dcccl export``: a run's on-device bundle as ONNX or TorchScript, with its parity check."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from jsonargparse import ActionYesNo, ArgumentParser

from dcccl.commands.pipeline import load_datamodule, pipeline_parser
from dcccl.deploy.bundle import export_run, parity_report
from dcccl.errors import ConfigError

EXPORT_HELP = """Export the on-device bundle of a pipeline run: the control model and the co-submodel (what runs on
a device) and the served cloud + co model, as ONNX or TorchScript with a dynamic batch dimension, plus bundle.json
(input shape, normalisation, class names). Parity with PyTorch is checked on real test samples by running the
written files (onnxruntime for ONNX, torch.jit.load for TorchScript)."""


def export_parser() -> ArgumentParser:
    """The parser of ``dcccl export``."""
    parser = ArgumentParser(prog="dcccl export", description=EXPORT_HELP, exit_on_error=False)
    parser.add_argument("--run_dir", type=str, required=True, help="A pipeline run directory.")
    parser.add_argument("--format", type=Literal["onnx", "torchscript"], default="onnx",
                        help="Export format: onnx (.onnx graphs) or torchscript (traced .pt files for torch.jit.load).")
    parser.add_argument("--out_dir", type=Optional[str], default=None, help="Default: <run_dir>/export/<format>.")
    parser.add_argument("--samples", type=int, default=256, help="Test samples for the parity check.")
    parser.add_argument("--debug", action=ActionYesNo, default=False, help="Show full tracebacks on errors.")
    return parser

def export_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl export``: write the bundle of a run in the chosen format and report the parity check."""
    cfg = export_parser().parse_args(argv)
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "pipeline.yaml"
    if not saved.is_file():
        raise ConfigError(f"{saved} not found: --run_dir must be a pipeline run directory")
    pipeline_cfg = pipeline_parser().parse_path(str(saved))
    datamodule = load_datamodule(pipeline_cfg.data, pipeline_cfg.seed_everything)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "export" / cfg.format
    bundle = export_run(run_dir, out_dir, datamodule.test_dataset(), datamodule.input_description(), cfg.format,
                        cfg.samples)
    print("\n".join(parity_report(bundle, out_dir)))
    if not all(check["passed"] for check in bundle["parity"].values()):
        raise SystemExit("dcccl export: parity check failed (see above)")
    return bundle
