"""Baseline: every device trains the co-submodel on its own samples alone, round after round, never fused."""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

import numpy as np

from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.costs import parameter_count
from dcccl.federated.ledger import Ledger
from dcccl.methods.method import CostContext, Method, plain_cross_entropy_on_devices, register_method
from dcccl.pipeline.metrics import CONFUSION_KEY, round_history, summarize, write_run_outputs
from dcccl.pipeline.plan import Plan, PlanBuilder
from dcccl.pipeline.settings import PipelineSettings
from dcccl.pipeline.steps import DeviceTask


@register_method
class DeviceOnly(Method):
    """Each device's own model, from DC-CCL's initial co-submodel, on its own share only.

    No device needs the network, so every device trains in every round. With a fleet the reported metrics are the
    mean over the devices' models, each evaluated on the union test set; ``per_device`` lists them one by one.
    """

    name = "device_only"
    title = "On-device only"
    position = 30
    per_round = False

    def settings(self, reference: PipelineSettings) -> PipelineSettings:
        """No guides, the co-submodel served alone, trained with plain cross-entropy."""
        base = super().settings(reference)
        stage_args = plain_cross_entropy_on_devices(base)
        return replace(base, cloud_round_guide="none", device_guide="none", serve_cloud_submodel=False,
                       finetune_head=False, stage_args=stage_args)

    def plan(self, settings: PipelineSettings, reference: RunDirectory) -> Plan:
        """Per round: one device stage in which every device continues from its own last copy; then an evaluation
        of each device's last copy."""
        run, build, fleet = settings.run, PlanBuilder(settings, settings.run), settings.fleet
        steps: Plan = []
        starts = {device: reference.initial_co_submodel for device in range(fleet.num_devices)}
        for r in range(1, settings.rounds + 1):
            tasks = [DeviceTask(device, starts[device], run.device_copy(r, device))  # nothing crosses the wire
                     for device in range(fleet.num_devices)]
            label = "the device alone" if fleet.num_devices == 1 else f"each of {fleet.num_devices} devices alone"
            steps.append(build.devices(tasks, None, f"round {r}/{settings.rounds}: {label}", r, False))
            starts = {task.device: task.export for task in tasks}
        for device, last in starts.items():
            single = fleet.num_devices == 1
            metrics = run.root / "evaluate" / ("metrics.json" if single else f"device_{device:03d}/metrics.json")
            steps.append(build.evaluation(last, metrics, "evaluation" if single else f"evaluation of device {device}",
                                          "rounds", None, round_index=settings.rounds))
        return steps

    def metrics(self, settings: PipelineSettings, plan: Plan, reference: RunDirectory) -> dict[str, Any]:
        """One device: as the pipeline reports it. A fleet: the mean over the devices' models (and their confusion
        matrices added up); nothing crosses the boundary, so the ledger is empty."""
        history = round_history(plan)
        confusions = [entry.pop(CONFUSION_KEY) for entry in history if CONFUSION_KEY in entry]
        confusion = np.sum(confusions, axis=0).tolist() if confusions else None
        if len(history) == 1:
            metrics = summarize(history, Ledger())
        else:
            mean = {key: statistics.fmean(entry[key] for entry in history)
                    for key, value in history[0].items() if isinstance(value, (int, float)) and key != "round"}
            metrics = {**summarize([{"round": settings.rounds, **mean}], Ledger()),
                       "per_device": [{key: entry[key] for key in mean} for entry in history]}
        write_run_outputs(settings, plan, settings.run, metrics, confusion, Ledger(), fleet_state=False)
        return metrics

    def costs(self, context: CostContext) -> dict[str, Any]:
        """The co-submodel on the device, nothing on the wire."""
        co = context.network(context.reference.initial_co_submodel, "co_submodel")
        return {**context.on_device(co), **context.wire(), "model_params": parameter_count(co)}
