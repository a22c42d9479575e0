"""Ablation: DC-CCL without the control model; the devices train the co-submodel unguided."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.costs import parameter_count
from dcccl.methods.method import CostContext, Method, register_method
from dcccl.pipeline.plan import Plan, Reused, dcccl_plan
from dcccl.pipeline.settings import PipelineSettings


@register_method
class DCCCLWithoutControl(Method):
    """DC-CCL's cloud submodel and initial co-submodel, devices trained without the control model."""

    name = "dcccl_no_control"
    title = "DC-CCL without control model"
    position = 40

    def settings(self, reference: PipelineSettings) -> PipelineSettings:
        """No guide on the devices."""
        return replace(super().settings(reference), device_guide="none")

    def plan(self, settings: PipelineSettings, reference: RunDirectory) -> Plan:
        """DC-CCL's plan without distillation, starting from DC-CCL's cloud submodel and initial co-submodel."""
        return dcccl_plan(settings, reused=Reused(cloud_submodel=reference.cloud_submodel,
                                                  initial_co_submodel=reference.initial_co_submodel))

    def reused_stage_dirs(self, reference: RunDirectory) -> list[Path]:
        """DC-CCL's cloud stage trained the cloud submodel it serves."""
        return [reference.cloud_submodel.parent]

    def costs(self, context: CostContext) -> dict[str, Any]:
        """The co-submodel alone on the device, down and up every round."""
        run = context.reference
        co = context.network(run.initial_co_submodel, "co_submodel")
        cloud = context.network(run.cloud_submodel, "cloud_submodel")
        return {**context.on_device(co), **context.co_submodel_rounds(co), "model_params": parameter_count(cloud, co)}
