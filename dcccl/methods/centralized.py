"""Upper bound: the served model f + h trained on every sample pooled on the cloud (violates privacy)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.costs import parameter_count
from dcccl.methods.method import NOTHING_ON_DEVICE, CostContext, Method, register_method
from dcccl.pipeline.plan import Plan, PlanBuilder
from dcccl.pipeline.settings import PipelineSettings
from dcccl.pipeline.stages import StageArguments


@dataclass(frozen=True)
class CentralizedArguments(StageArguments):
    """What the plan gives the ``centralized`` stage: DC-CCL's cloud submodel (its architecture) and initial
    co-submodel to start from, and where both trained networks go."""

    cloud_architecture: Path
    co_submodel: Path
    export_path: Path
    co_export_path: Path


@register_method
class Centralized(Method):
    """DC-CCL's architectures trained jointly on the pooled samples, evaluated like DC-CCL."""

    name = "centralized"
    title = "Centralized (privacy-violating upper bound)"
    position = 60
    privacy_violating = True
    per_round = False
    needs_stages = ("centralized",)

    def settings(self, reference: PipelineSettings) -> PipelineSettings:
        """DC-CCL's settings in its own run directory; one round (it has no rounds)."""
        return replace(super().settings(reference), rounds=1)

    def plan(self, settings: PipelineSettings, reference: RunDirectory) -> Plan:
        """One centralized stage (f built like DC-CCL's, h starting from DC-CCL's initial one), then evaluation."""
        run = settings.run
        co_submodel = run.cloud_submodel.parent / "co_submodel.pt"
        build = PlanBuilder(settings, run)
        arguments = CentralizedArguments(reference.cloud_submodel, reference.initial_co_submodel, run.cloud_submodel,
                                         co_submodel)
        train = build.call("centralized", arguments, (run.cloud_submodel, co_submodel),
                           "centralized training on pooled samples", "cloud",
                           inputs=(reference.cloud_submodel, reference.initial_co_submodel), partition="pooled")
        evaluation = build.evaluation(co_submodel, run.root / "evaluate" / "metrics.json", "evaluation", "cloud",
                                      run.cloud_submodel, round_index=1)
        return [train, evaluation]

    def costs(self, context: CostContext) -> dict[str, Any]:
        """Nothing trains on a device, but every raw device training sample goes up once."""
        run = context.run
        cloud = context.network(run.cloud_submodel, "cloud_submodel")
        co = context.network(run.cloud_submodel.parent / "co_submodel.pt", "co_submodel")
        return {**NOTHING_ON_DEVICE, **context.wire(up_once=context.device_sample_bytes),
                "model_params": parameter_count(cloud, co)}
