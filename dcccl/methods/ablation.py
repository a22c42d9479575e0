"""Variants of DC-CCL side by side (``dcccl ablate``): one run per variant and seed, the first variant the reference.

A variant is DC-CCL with some settings changed (a class-aware fusion, another distillation loss...). Its cloud
submodel and control model are taken from the reference run of the same seed when its cloud and distillation stages
would be configured exactly alike (same description, so the same training), so only what differs is trained again.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from dcccl.artifacts.atomic import atomic_write_json, atomic_write_text
from dcccl.artifacts.manifest import fingerprint
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.errors import ConfigError, MissingFileError
from dcccl.pipeline.plan import Plan, Reused, dcccl_plan
from dcccl.pipeline.settings import PipelineSettings
from dcccl.pipeline.steps import StageCall

ABLATION_KEYS = ("acc", "acc_cloud_classes", "acc_device_classes")


@dataclass(frozen=True)
class VariantRun:
    """One variant under one seed.

    Args:
        name: The variant's name.
        seed: The seed.
        settings: Its settings (its own run directory).
        plan: Its plan (taking the reference's cloud submodel and control model where they are the same).
        reused: What it takes from the reference run.
    """

    name: str
    seed: int
    settings: PipelineSettings
    plan: Plan
    reused: Reused

    @property
    def cloud_submodel(self) -> Path:
        """The cloud submodel the variant serves (its own, or the reference's)."""
        return self.reused.cloud_submodel or self.settings.run.cloud_submodel

    @property
    def control_model(self) -> Path:
        """The control model the variant's devices train under (its own, or the reference's)."""
        return self.reused.control_model or self.settings.run.control_model


def _stage(plan: Plan, stage: str) -> StageCall | None:
    return next((step for step in plan if isinstance(step, StageCall) and step.stage == stage), None)


def _same(stage: str, plan: Plan, run: RunDirectory, reference_plan: Plan, reference: RunDirectory) -> bool:
    ours, theirs = _stage(plan, stage), _stage(reference_plan, stage)
    return ours is not None and theirs is not None and \
        fingerprint(ours.describe(), run.root) == fingerprint(theirs.describe(), reference.root)


class Ablation:
    """Every variant for every seed, under ``<run_dir>/ablation/<variant>/seed_<k>``.

    Args:
        variants: Each variant's settings by name, in order; the first is the reference.
        seeds: The seeds.
        root: Where the runs and the table go.
    """

    def __init__(self, variants: dict[str, PipelineSettings], seeds: Sequence[int], root: Path) -> None:
        self.variants = variants
        self.seeds = list(seeds)
        self.root = root

    def runs(self, seed: int) -> list[VariantRun]:
        """Every variant under ``seed``, the reference first."""
        runs: list[VariantRun] = []
        reference_plan: Plan = []
        reference_run = RunDirectory(self.root)
        for position, (name, settings) in enumerate(self.variants.items()):
            seeded = replace(settings, seed_everything=seed, name=name,
                             run_dir=str(self.root / name / f"seed_{seed}"))
            plan = dcccl_plan(seeded)
            reused = Reused()
            if position > 0:
                cloud = _same("cloud", plan, seeded.run, reference_plan, reference_run)
                control = cloud and _same("distill", plan, seeded.run, reference_plan, reference_run)
                reused = Reused(cloud_submodel=reference_run.cloud_submodel if cloud else None,
                                control_model=reference_run.control_model if control else None)
                plan = dcccl_plan(seeded, reused=reused)
            else:
                reference_plan, reference_run = plan, seeded.run
            runs.append(VariantRun(name, seed, seeded, plan, reused))
        return runs


def _bytes_per_round(metrics: dict[str, Any]) -> Optional[float]:
    if "transfers/uplink_bytes" not in metrics or not metrics.get("rounds"):
        return None
    return (metrics["transfers/downlink_bytes"] + metrics["transfers/uplink_bytes"]) / len(metrics["rounds"])


# Columns a variant has only sometimes: the epsilon its devices spent (DP-SGD), the membership attack's AUC
# (dcccl ablate --audit) and the bytes crossing the boundary per round.
OPTIONAL_COLUMNS: dict[str, Callable[[dict[str, Any]], Optional[float]]] = {
    "epsilon": lambda m: m.get("privacy/epsilon_max"),
    "membership_auc": lambda m: m.get("membership/auc"),
    "bytes_per_round": _bytes_per_round,
}
OPTIONAL_TITLES = {"epsilon": "ε spent (max over devices)", "membership_auc": "Membership AUC",
                   "bytes_per_round": "KB per round (down + up)"}


def ablation_table(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """``ablation.json``: per variant the accuracies and the control model's fidelity, mean and std over seeds (and
    the :data:`OPTIONAL_COLUMNS` every seed of the variant has).

    Args:
        results: ``{variant: {seed: metrics}}``, where metrics are the run's ``metrics.json`` plus ``fidelity``
            (``{"cloud_test": {...}, "device_test": {...}}``) and, audited, ``membership/auc``.
    """
    table: dict[str, Any] = {"variants": list(results)}
    for name, per_seed in results.items():
        entry: dict[str, Any] = {"seeds": sorted(per_seed)}
        columns = {key: [float(m[f"served/{key}"]) for m in per_seed.values()] for key in ABLATION_KEYS}
        for side in ("cloud_test", "device_test"):
            columns[f"agreement_{side}"] = [float(m["fidelity"][side]["agreement"]) for m in per_seed.values()]
        for key, read in OPTIONAL_COLUMNS.items():
            readings = [read(m) for m in per_seed.values()]
            present = [float(value) for value in readings if value is not None]
            if present and len(present) == len(readings):
                columns[key] = present
        for key, values in columns.items():
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table[name] = entry
    return table


def _optional_cell(key: str, entry: dict[str, Any]) -> str:
    if key not in entry:
        return "no DP" if key == "epsilon" else "–"
    if key == "bytes_per_round":
        return f"{entry[key] / 1000:,.1f}"
    return f"{entry[key]:.3f} ± {entry[f'{key}_std']:.3f}" if key == "membership_auc" else \
        f"{entry[key]:.2f} ± {entry[f'{key}_std']:.2f}"


def ablation_markdown(table: dict[str, Any], descriptions: dict[str, str]) -> str:
    """The table in markdown: accuracy in percent (mean ± std over the seeds) and the control model's agreement;
    the epsilon and the membership AUC where a variant has them, the bytes per round where variants differ in it."""
    entries = [table[name] for name in table["variants"]]
    optional = [key for key in OPTIONAL_COLUMNS if any(key in entry for entry in entries)]
    if "bytes_per_round" in optional and len({round(entry.get("bytes_per_round", -1)) for entry in entries}) < 2:
        optional.remove("bytes_per_round")
    header = ("| Variant | Acc (%) | Cloud classes (%) | Device-only classes (%) | g agrees with f, cloud test (%) "
              "| g agrees with f, device test (%) | " + "".join(f"{OPTIONAL_TITLES[key]} | " for key in optional)
              + "What changes |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name in table["variants"]:
        entry = table[name]
        cells = [f"{100 * entry[key]:.1f} ± {100 * entry[f'{key}_std']:.1f}"
                 for key in (*ABLATION_KEYS, "agreement_cloud_test", "agreement_device_test")]
        cells += [_optional_cell(key, entry) for key in optional]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {descriptions.get(name, '')} |")
    seeds = ", ".join(str(seed) for seed in table[table["variants"][0]]["seeds"])
    return "\n".join(lines) + f"\n\nSeeds: {seeds} (mean ± std).\n"


def write_ablation(table: dict[str, Any], descriptions: dict[str, str], root: Path) -> dict[str, Path]:
    """Write ``ablation.json`` and ``ablation.md`` into ``root``; returns their paths."""
    paths = {"json": root / "ablation.json", "markdown": root / "ablation.md"}
    atomic_write_json(paths["json"], {**table, "descriptions": descriptions})
    atomic_write_text(paths["markdown"], ablation_markdown(table, descriptions))
    return paths


def read_variants(path: Path, only: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The variants of a YAML file (``variants: {name: {description, settings}}``), the first always kept.

    Raises:
        ConfigError: The file does not hold variants, or ``only`` names one it does not hold.
    """
    import yaml

    if not path.is_file():
        raise MissingFileError(f"variants file not found: {path}")
    variants = (yaml.safe_load(path.read_text()) or {}).get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{path} holds no variants: write variants: {{name: {{description: ..., settings: "
                          "{...}}}}, the first being the reference")
    unknown = sorted(set(only or []) - set(variants))
    if unknown:
        raise ConfigError(f"{path} has no variants {unknown}; it has {list(variants)}")
    names = list(variants)
    kept = [names[0], *(name for name in names[1:] if only is None or name in only)]
    for name in kept:
        entry = variants[name] or {}
        if not isinstance(entry, dict) or not isinstance(entry.get("settings", {}), dict):
            raise ConfigError(f"variant {name!r} of {path} must be a mapping with description and settings")
    return {name: {"description": (variants[name] or {}).get("description", ""),
                   "settings": (variants[name] or {}).get("settings", {})} for name in kept}
