"""``dcccl ablate``: variants of DC-CCL for every seed on the same data partition, then their table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from dcccl.commands.audit import audit_membership
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
from dcccl.config_path import ConfigPath
from dcccl.methods.ablation import Ablation, ablation_markdown, ablation_table, read_variants, write_ablation
from dcccl.methods.comparison import control_fidelity_of
from dcccl.pipeline.execution import PlanRun
from dcccl.pipeline.settings import PipelineSettings

ABLATE_HELP = """Run variants of DC-CCL side by side on the same data partition and seeds, and write the table of their
accuracies and control-model fidelity (mean and std over the seeds) to <run_dir>/ablation/ablation.md and .json.
--variants names a YAML file of variants: each a description and the pipeline settings it changes (see
configs/ablations/variants.yaml); the first variant is the reference, and a variant whose cloud and distillation
stages are the reference's takes the reference's cloud submodel and control model instead of training them again."""


def ablate_parser() -> ArgumentParser:
    """The parser of ``dcccl ablate``: the pipeline's options plus ``--variants``, ``--only`` and ``--seeds``."""
    parser = pipeline_parser("dcccl ablate", ABLATE_HELP)
    parser.add_argument("--variants", type=ConfigPath, required=True, help="YAML file of variants.")
    parser.add_argument("--only", type=str, default=None, nargs="+", help="Run only these variants (and the first).")
    parser.add_argument("--seeds", type=int, default=[0], nargs="+", help="Seeds, e.g. --seeds 0 1 2.")
    parser.add_argument("--audit", action=ActionYesNo, default=False,
                        help="Run dcccl audit's membership-inference attack on every variant's device copies and add "
                             "its AUC to the table.")
    return parser

def variant_settings(parser: ArgumentParser, cfg: Namespace,
                     described: dict[str, dict[str, Any]]) -> dict[str, PipelineSettings]:
    """Each variant's pipeline settings: the parsed config with the variant's settings parsed over it."""
    return {name: settings_from(parser, parser.parse_object(entry["settings"], namespace=cfg.clone()))
            for name, entry in described.items()}


def ablate_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl ablate``: every variant for every seed, then ablation.json/.md."""
    parser = ablate_parser()
    cfg = parser.parse_args(argv)
    described = read_variants(Path(cfg.variants), cfg.only)
    variants = variant_settings(parser, cfg, described)
    for settings in variants.values():
        check_stage_names(settings)
    first = next(iter(variants.values()))
    ablation = Ablation(variants, cfg.seeds, first.run.root / "ablation")
    runner = LightningRunner(verbose=cfg.verbose)
    variant_runs = [run for seed in ablation.seeds for run in ablation.runs(seed)]
    runs = [(run.name, run.seed, PlanRun(run.settings, run.plan, runner, restart_point(cfg), cfg.rerun_changed))
            for run in variant_runs]
    datamodules = {seed: datamodule_of(replace(first, seed_everything=seed)) for seed in ablation.seeds}
    data = {seed: datamodule.describe() for seed, datamodule in datamodules.items()}
    metrics = check_then_run("ablate", runs, data)
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in variants}
    for run, run_metrics in zip(variant_runs, metrics):
        fidelity = control_fidelity_of(run.cloud_submodel, run.control_model, datamodules[run.seed])
        results[run.name][run.seed] = {**run_metrics, "fidelity": fidelity}
        if cfg.audit and is_rank_zero():
            audited = audit_membership(run.plan, datamodule_of(run.settings), run.settings.run.root,
                                       run.settings.device_guide == "control_model", run.seed)
            results[run.name][run.seed]["membership/auc"] = audited["auc"]
    if not is_rank_zero():
        return {}
    table = ablation_table(results)
    paths = write_ablation(table, {name: entry.get("description", "") for name, entry in described.items()},
                           ablation.root)
    print(f"\nDC-CCL variants ({ablation.root}):\n\n{ablation_markdown(table, {})}")
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return table
