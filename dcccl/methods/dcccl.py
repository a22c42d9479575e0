"""DC-CCL itself, as configured: the reference every other method is compared with."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.costs import parameter_count, state_dict_bytes
from dcccl.methods.method import CostContext, Method, register_method
from dcccl.pipeline.plan import Plan, dcccl_plan
from dcccl.pipeline.settings import PipelineSettings


@register_method
class DCCCL(Method):
    """The pipeline itself, in DC-CCL's own run directory."""

    name = "dcccl"
    title = "DC-CCL"
    position = 50

    def settings(self, reference: PipelineSettings) -> PipelineSettings:
        """DC-CCL's settings, unchanged (its run directory is the comparison's)."""
        return replace(reference, name=self.name)

    def plan(self, settings: PipelineSettings, reference: RunDirectory) -> Plan:
        """The DC-CCL plan."""
        return dcccl_plan(settings)

    def costs(self, context: CostContext) -> dict[str, Any]:
        """Control model (once) and co-submodel (every round) down; both trained on, the control model frozen."""
        run = context.reference
        co = context.network(run.initial_co_submodel, "co_submodel")
        control = context.network(run.control_model, "control_model")
        cloud = context.network(run.cloud_submodel, "cloud_submodel")
        return {**context.on_device(co, control), **context.co_submodel_rounds(co),
                "downlink_bytes_once": state_dict_bytes(control), "model_params": parameter_count(cloud, co)}
