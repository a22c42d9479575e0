"""One plan in its run directory, from start to metrics: what would run, the checks before anything is written,
the execution, and the metrics it leaves behind."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from dcccl.errors import DCCCLError
from dcccl.pipeline.boundary import DeviceGate
from dcccl.pipeline.coordinator import Coordinator, StageRunner
from dcccl.pipeline.fusion import FusionStep
from dcccl.pipeline.metrics import collect_metrics, metrics_are_current, read_metrics
from dcccl.pipeline.plan import Plan
from dcccl.pipeline.preflight import DataDescription, check_before_running
from dcccl.pipeline.settings import PipelineSettings, RestartPoint
from dcccl.pipeline.steps import StageCall

log = logging.getLogger("dcccl")

MetricsOf = Callable[[PipelineSettings, Plan], dict[str, Any]]


def _pipeline_metrics(settings: PipelineSettings, plan: Plan) -> dict[str, Any]:
    return collect_metrics(settings, plan, settings.run)


def cloud_submodel_of(plan: Plan) -> Optional[Path]:
    """The cloud submodel a plan trains, or the one its control model is distilled from (``None``: neither)."""
    for step in plan:
        if isinstance(step, StageCall) and step.stage == "cloud":
            return step.outputs[0]
        if isinstance(step, StageCall) and step.stage == "distill" and step.model_args.get("cloud_submodel"):
            return Path(step.model_args["cloud_submodel"])
    return None


class PlanRun:
    """A plan of a run and what the coordinator would do with it.

    Args:
        settings: The run's settings.
        plan: Its steps.
        runner: Runs the stage calls.
        restart_from: Re-run from this restart point on (``--force`` is ``cloud``).
        rerun_changed: Re-run finished steps whose config changed instead of refusing.
        metrics: How the metrics are collected once the plan ran (default: the pipeline's ``metrics.json``).

    A refusal of :meth:`Coordinator.decide` (a corrupted artifact, a changed config) is raised by :meth:`check`,
    after the data, the stage configs and the backbones were checked, and by :meth:`execute`.
    """

    def __init__(self, settings: PipelineSettings, plan: Plan, runner: StageRunner,
                 restart_from: Optional[RestartPoint] = None, rerun_changed: bool = False,
                 metrics: MetricsOf = _pipeline_metrics) -> None:
        self.settings = settings
        self.plan = plan
        self.runner = runner
        self.coordinator = Coordinator(settings.run, runner, settings.name, restart_from, rerun_changed)
        self.refusals: list[DCCCLError] = []
        self.decisions = self.coordinator.decide(plan, self.refusals)
        self._metrics = metrics

    @property
    def up_to_date(self) -> bool:
        """Nothing to run and the metrics were written from this very plan: the run is finished as configured."""
        return not self.refusals and not any(decision.runs for decision in self.decisions) and (
            not self.plan or metrics_are_current(self.settings, self.plan, self.coordinator.manifest))

    def check(self, data: DataDescription) -> None:
        """Every check before anything runs (boundary, backbones, kept artifacts, budget, head API)."""
        check_before_running(self.settings, self.plan, self.decisions, self.runner, data, self.refusals)

    def execute(self, data: Optional[DataDescription]) -> dict[str, Any]:
        """Run what must run and return the metrics (read back when the run was already up to date)."""
        if self.up_to_date and self.plan:
            log.info("[dcccl %s] all %d steps are done already; nothing to run (%s)", self.settings.name,
                     len(self.plan), self.settings.run.metrics)
            return read_metrics(self.settings.run)
        plan = self.plan
        if data is not None:
            self.coordinator.before_stage = DeviceGate(self.settings.device_budget, data.sample_shape,
                                                       data.num_classes, cloud_submodel_of(plan))
            # A runner whose devices may train on data of their own (Flower) says so: only the config's cap holds.
            known = getattr(self.runner, "devices_train_on_the_partition", True)
            shares = self.settings.fleet.share_limits([len(part) for part in data.device_parts] if known else [])
            plan = [replace(step, device_shares=shares) if isinstance(step, FusionStep) else step for step in plan]
        if self.refusals:
            raise self.refusals[0]
        self.coordinator.execute(plan)
        return self._metrics(self.settings, self.plan)
