"""``dcccl compare``: DC-CCL and its baselines for every seed on the same data partition, then the comparison table
and plots."""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser

from dcccl.artifacts.atomic import atomic_write_text
from dcccl.commands.pipeline import (
    LightningRunner,
    check_stage_names,
    check_then_run,
    datamodule_of,
    is_rank_zero,
    pipeline_parser,
    restart_point,
    settings_from,
)
from dcccl.methods import METHODS, select
from dcccl.methods.comparison import Comparison, control_fidelity_of, method_costs
from dcccl.methods.comparison_report import build_comparison, markdown_table, write_outputs
from dcccl.pipeline.execution import PlanRun

COMPARE_HELP = """Compare DC-CCL with its baselines on the same data partition and seed: every method of
dcccl.methods (cloud-only model, device-affordable small model with FedAvg, on-device only, DC-CCL without control
model, DC-CCL, centralized upper bound). Takes any pipeline config; reuses and skips what the run directory holds.
Writes comparison.json, comparison.md and PNG plots into the run directory."""


def compare_parser() -> ArgumentParser:
    """The parser of ``dcccl compare``: the pipeline's options plus ``--seeds`` and ``--methods``."""
    parser = pipeline_parser("dcccl compare", COMPARE_HELP)
    parser.add_argument("--seeds", type=int, default=None, nargs="+",
                        help="Seeds to repeat every method with (mean and std are reported), e.g. --seeds 0 1 2.")
    parser.add_argument("--methods", type=str, default=None, nargs="+",
                        help=f"Methods to compare (default: all of {', '.join(sorted(METHODS))}).")
    return parser


def compare_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl compare``: every method for every seed, cost figures, fidelity, then comparison.json/.md and plots."""
    parser = compare_parser()
    cfg = parser.parse_args(argv)
    settings = settings_from(parser, cfg)
    check_stage_names(settings)
    methods = select(cfg.methods)
    comparison = Comparison(settings, cfg.seeds, methods)
    runner = LightningRunner(verbose=cfg.verbose)
    method_runs = [method_run for seed in comparison.seeds for method_run in comparison.runs(seed)]
    runs = [(method_run.method.title, method_run.seed,
             PlanRun(method_run.settings, method_run.plan, runner, restart_point(cfg), cfg.rerun_changed,
                     metrics=method_run.metrics)) for method_run in method_runs]
    datamodules = {seed: datamodule_of(comparison.reference_settings(seed)) for seed in comparison.seeds}
    data = {seed: datamodule.describe() for seed, datamodule in datamodules.items()}

    def write_config() -> None:
        if is_rank_zero():
            atomic_write_text(comparison.root / "compare.yaml", parser.dump(cfg, skip_none=False))

    metrics = check_then_run("compare", runs, data, write_config)
    if not is_rank_zero():
        return {}
    results: dict[int, dict[str, dict[str, Any]]] = {seed: {} for seed in comparison.seeds}
    for method_run, method_metrics in zip(method_runs, metrics):
        results[method_run.seed][method_run.method.name] = method_metrics
    fidelity = {seed: control_fidelity_of(run.cloud_submodel, run.control_model, datamodules[seed])
                for seed in comparison.seeds for run in [comparison.reference_settings(seed).run]}
    costs = method_costs(comparison.runs(comparison.seeds[0]), datamodules[comparison.seeds[0]])
    table = build_comparison(results, costs, fidelity, methods)
    paths = write_outputs(table, comparison.root)
    print(f"\nDC-CCL comparison ({comparison.root}):\n\n{markdown_table(table)}")
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return table
