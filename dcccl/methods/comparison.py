"""The paper's comparison: every registered method, for every seed, on the same data partition.

Nothing here trains a network itself: each method is a plan that the coordinator runs in its own run directory
under DC-CCL's; DC-CCL runs first, since the other methods take its artifacts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Protocol

from torch.utils.data import DataLoader, Dataset

from dcccl.artifacts.exports import load_network
from dcccl.artifacts.run_dir import BUDGET_REPORT, RunDirectory
from dcccl.errors import ConfigError
from dcccl.federated.costs import control_fidelity
from dcccl.methods.method import CostContext, Method, registered
from dcccl.pipeline.plan import Plan
from dcccl.pipeline.settings import PipelineSettings
from dcccl.pipeline.steps import StageCall

REFERENCE = "dcccl"


@dataclass(frozen=True)
class MethodRun:
    """One method under one seed: its settings, its plan, and DC-CCL's run directory it may read from.

    Args:
        method: The method.
        seed: The seed.
        settings: The method's settings.
        plan: Its plan.
        reference: DC-CCL's run directory under this seed.
    """

    method: Method
    seed: int
    settings: PipelineSettings
    plan: Plan
    reference: RunDirectory

    def metrics(self, settings: PipelineSettings, plan: Plan) -> dict[str, Any]:
        """What the method reports once its plan ran."""
        return self.method.metrics(settings, plan, self.reference)


class Comparison:
    """Every method for every seed.

    Args:
        settings: DC-CCL's settings (as ``dcccl pipeline`` takes them).
        seeds: Seeds to repeat the comparison with; default: the settings' own seed only.
        methods: The methods to run (default: every registered one); DC-CCL is always among them.
    """

    def __init__(self, settings: PipelineSettings, seeds: Optional[Sequence[int]] = None,
                 methods: Optional[Sequence[Method]] = None) -> None:
        self.settings = settings
        self.seeds = list(seeds) if seeds else [settings.seed_everything]
        self.methods = list(methods) if methods is not None else registered()
        if REFERENCE not in {method.name for method in self.methods}:
            raise ConfigError("dcccl compare always runs DC-CCL: add dcccl to --methods")
        missing = sorted({stage for method in self.methods for stage in method.needs_stages} - set(settings.stages))
        if missing:
            raise ConfigError(
                f"dcccl compare needs stage configs for {', '.join(missing)} in the pipeline config ("
                + ", ".join(f"stages.{name}" for name in missing) + "; see configs/quickstart.yaml)")
        self.root = settings.run.root

    def seed_dir(self, seed: int) -> Path:
        """Run directory of DC-CCL under ``seed`` (the run directory itself when there is one seed)."""
        return self.root if len(self.seeds) == 1 else self.root / "seeds" / f"seed_{seed}"

    def reference_settings(self, seed: int) -> PipelineSettings:
        """DC-CCL's settings under ``seed``."""
        return replace(self.settings, seed_everything=seed, run_dir=str(self.seed_dir(seed)))

    def runs(self, seed: int) -> list[MethodRun]:
        """Every method under ``seed``, DC-CCL first (the others read its artifacts), then in table order."""
        reference = self.reference_settings(seed)
        ordered = sorted(self.methods, key=lambda method: (method.name != REFERENCE, method.position))
        runs = []
        for method in ordered:
            settings = method.settings(reference)
            runs.append(MethodRun(method, seed, settings, method.plan(settings, reference.run), reference.run))
        return runs


class DataSource(Protocol):
    """What measuring the comparison needs of the data (a dcccl DataModule is one)."""

    batch_size: int

    def train_dataset(self, partition: Any) -> Dataset:
        """Training samples of a partition."""

    def side_test_dataset(self, side: Any) -> Dataset:
        """Test samples of the classes a side holds."""


def control_fidelity_of(cloud_submodel: Path, control_model: Path, data: DataSource) -> dict[str, dict[str, float]]:
    """How well a control model mimics its cloud submodel on cloud-side and device-side test samples."""
    cloud = load_network(cloud_submodel, "cloud_submodel")
    control = load_network(control_model, "control_model")
    return {f"{side}_test": control_fidelity(cloud, control, DataLoader(data.side_test_dataset(side), batch_size=256))
            for side in ("cloud", "device")}


def method_costs(runs: Sequence[MethodRun], data: DataSource) -> dict[str, dict[str, Any]]:
    """Every method's costs, measured with one device training batch and the size of all raw device samples."""
    device_samples = data.train_dataset("device")
    x, y = next(iter(DataLoader(device_samples, batch_size=data.batch_size)))
    sample_bytes = sum(images.numel() * images.element_size()
                       for images, _ in DataLoader(device_samples, batch_size=256))
    return {run.method.name: {**run.method.costs(CostContext(x, y, sample_bytes, run.reference, run.settings.run)),
                              "train_sample_passes": sample_passes(run)} for run in runs}


def sample_passes(run: MethodRun) -> Optional[int]:
    """Training samples the method's served model went through, over every stage that trained it (``budget.json``
    of each; ``None`` when a stage has no budget report)."""
    dirs = [step.work_dir for step in run.plan if isinstance(step, StageCall) and step.command == "fit"]
    total = 0
    for folder in dict.fromkeys([*dirs, *run.method.reused_stage_dirs(run.reference)]):
        report = folder / BUDGET_REPORT
        if not report.is_file():
            return None
        total += int(json.loads(report.read_text())["samples"])
    return total
