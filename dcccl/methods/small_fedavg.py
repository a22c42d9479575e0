"""Baseline: a device-affordable small model (the co-submodel's architecture) trained with FedAvg on cloud and
device samples; the cloud is one more client."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.aggregation import FedAvg
from dcccl.federated.costs import parameter_count
from dcccl.methods.method import CostContext, Method, plain_cross_entropy_on_devices, register_method
from dcccl.pipeline.plan import Plan, Reused, dcccl_plan
from dcccl.pipeline.settings import PipelineSettings


@register_method
class SmallFedAvg(Method):
    """No large model anywhere: the cloud trains the small model as a plain client, copies weighted by samples."""

    name = "small_fedavg"
    title = "Device-affordable small model (FedAvg)"
    position = 20
    needs_stages = ("fedavg_client",)

    def settings(self, reference: PipelineSettings) -> PipelineSettings:
        """Plain FedAvg: no guides, the small model served alone, every copy (the cloud's too) trained with
        cross-entropy from the round's model and weighted by its sample count."""
        base = super().settings(reference)
        weighting = base.rule.device_weighting if isinstance(base.rule, FedAvg) else "samples"
        stage_args = plain_cross_entropy_on_devices(base)
        return replace(base, cloud_round_guide="none", device_guide="none", serve_cloud_submodel=False,
                       aggregation=FedAvg(cloud_share=None, device_weighting=weighting), finetune_head=False,
                       round_order="parallel", stage_args=stage_args)

    def plan(self, settings: PipelineSettings, reference: RunDirectory) -> Plan:
        """Rounds of the cloud as a FedAvg client and the devices, from DC-CCL's initial co-submodel."""
        return dcccl_plan(settings, reused=Reused(initial_co_submodel=reference.initial_co_submodel),
                          cloud_round_stage="fedavg_client")

    def costs(self, context: CostContext) -> dict[str, Any]:
        """The small model on the device, down and up every round."""
        small = context.network(context.reference.initial_co_submodel, "co_submodel")
        return {**context.on_device(small), **context.co_submodel_rounds(small), "model_params": parameter_count(small)}
