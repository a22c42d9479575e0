"""Baseline: the cloud submodel alone, as DC-CCL's cloud stage trained it (nothing more is trained)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.costs import parameter_count
from dcccl.methods.method import NOTHING_ON_DEVICE, CostContext, Method, register_method
from dcccl.pipeline.plan import Plan
from dcccl.pipeline.settings import PipelineSettings


@register_method
class CloudOnly(Method):
    """The model the cloud serves without any device: DC-CCL's evaluation of ``f`` alone."""

    name = "cloud_only"
    title = "Cloud-only model"
    position = 10
    per_round = False

    def plan(self, settings: PipelineSettings, reference: RunDirectory) -> Plan:
        """Nothing to run: DC-CCL's evaluations already score ``f`` alone."""
        return []

    def metrics(self, settings: PipelineSettings, plan: Plan, reference: RunDirectory) -> dict[str, Any]:
        """DC-CCL's ``cloud_only/*`` figures, as ``served/*``."""
        dcccl = json.loads(reference.metrics.read_text())
        return {key.replace("cloud_only/", "served/"): value for key, value in dcccl.items()
                if key.startswith("cloud_only/")}

    def reused_stage_dirs(self, reference: RunDirectory) -> list[Path]:
        """DC-CCL's cloud stage trained the cloud submodel it serves."""
        return [reference.cloud_submodel.parent]

    def costs(self, context: CostContext) -> dict[str, Any]:
        """Nothing on the device, nothing on the wire."""
        cloud = context.network(context.reference.cloud_submodel, "cloud_submodel")
        return {**NOTHING_ON_DEVICE, **context.wire(), "model_params": parameter_count(cloud)}
