"""The coordinator: executes a plan through a stage runner, skipping what is done and resuming what was cut short.

It knows nothing of Lightning. A :class:`StageCall` goes to the :class:`StageRunner` (``cli.py`` provides the one
that runs it through the same LightningCLI parser users run by hand); a :class:`LocalStep` (fusion) is a plain
function the coordinator calls itself. The manifest decides what may be skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Protocol

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.lineage import recorded_lineages
from dcccl.artifacts.manifest import ConfigChangedError, IntegrityError, Manifest, fingerprint, inputs_fingerprint
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.errors import DCCCLError
from dcccl.pipeline.boundary import ResolvedStage
from dcccl.pipeline.config_snapshot import origin_of
from dcccl.pipeline.progress import PROGRESS_FIELD, RunProgress, format_seconds, step_kind
from dcccl.pipeline.settings import RESTART_ORDER, RestartPoint
from dcccl.pipeline.steps import LocalStep, StageCall, Step
from dcccl.ranks import barrier, is_global_zero

log = logging.getLogger("dcccl")


class StageRunner(Protocol):
    """Runs stage calls: the coordinator's only way to train or evaluate anything."""

    def resolve(self, call: StageCall) -> ResolvedStage:
        """The config ``call`` would run with, parsed and resolved; nothing is instantiated or written."""

    def __call__(self, call: StageCall, resume: bool) -> None:
        """Run ``call``; with ``resume``, continue from its last checkpoint."""


class StageFailedError(RuntimeError):
    """A step finished without producing the artifacts it promised (a bug in the stage, not bad input)."""


@dataclass(frozen=True)
class Decision:
    """Whether a step runs, and why.

    Args:
        step: The step.
        runs: Whether it runs.
        why: ``done`` (skipped), ``missing`` (outputs absent), ``forced`` (``--force``/``--from_stage``),
            ``after`` (an earlier step ran), ``changed`` (its config changed, ``--rerun_changed``), ``inputs``
            (an artifact it reads was made again).
        config_sha256: Fingerprint of its description.
    """

    step: Step
    runs: bool
    why: Literal["done", "missing", "forced", "after", "changed", "inputs"]
    config_sha256: str


class Coordinator:
    """Executes plans in one run directory.

    Once one step runs, every later step of the plan runs too, since its inputs may have changed.

    Args:
        run: The run directory.
        runner: Runs the stage calls.
        name: The run's name, for progress messages.
        restart_from: Re-run from this restart point on (``cloud`` re-runs everything).
        rerun_changed: When the config of a finished step changed, run it and every later step again instead of
            refusing.
        before_stage: Called with every stage call just before it runs (the device gate).
    """

    def __init__(self, run: RunDirectory, runner: StageRunner, name: str = "dcccl",
                 restart_from: Optional[RestartPoint] = None, rerun_changed: bool = False,
                 before_stage: Optional[Callable[[StageCall], None]] = None) -> None:
        self.run = run
        self.runner = runner
        self.name = name
        self.restart_from = restart_from
        self.rerun_changed = rerun_changed
        self.before_stage = before_stage
        self.manifest = Manifest(run.manifest)

    def forced(self, restart_point: RestartPoint) -> bool:
        """Whether ``--force``/``--from_stage`` make the steps of ``restart_point`` run again."""
        return self.restart_from is not None and \
            RESTART_ORDER.index(restart_point) >= RESTART_ORDER.index(self.restart_from)

    def decide(self, plan: Sequence[Step], refusals: Optional[list[DCCCLError]] = None) -> list[Decision]:
        """What :meth:`execute` would run and why; reads, writes nothing.

        Args:
            plan: The steps.
            refusals: Collect the refusal here (and stop deciding) instead of raising it.

        Raises:
            IntegrityError: A kept artifact's bytes differ from those recorded (corrupted or truncated).
            ConfigChangedError: A finished step's config changed and ``rerun_changed`` is off.
        """
        decisions: list[Decision] = []
        after = False
        for step in plan:
            try:
                decisions.append(self._decide(step, after))
            except (IntegrityError, ConfigChangedError) as refusal:
                if refusals is None:
                    raise
                refusals.append(refusal)
                break
            after = after or decisions[-1].runs
        return decisions

    def _decide(self, step: Step, after: bool) -> Decision:
        config = fingerprint(step.describe(), self.run.root)
        if after:
            return Decision(step, True, "after", config)
        if self.forced(step.restart_point):
            return Decision(step, True, "forced", config)
        if not all(path.is_file() for path in step.outputs):
            return Decision(step, True, "missing", config)
        return self._finished(step, config)

    def _finished(self, step: Step, config: str) -> Decision:
        for path in step.outputs:
            self.manifest.verify(path)
        entries = [entry for path in step.outputs if (entry := self.manifest.entry(path)) is not None]
        if not entries:  # written before the manifest existed, or just before a kill: taken as they are
            return Decision(step, False, "done", config)
        if {entry.config_sha256 for entry in entries} != {config}:
            if not self.rerun_changed:
                raise ConfigChangedError(
                    f"the config of the finished stage {step.label!r} changed since it ran ({step.outputs[0]}). "
                    "Re-run with --rerun_changed to run it and every later stage again, choose a point with "
                    "--from_stage, or use a new --run_dir")
            return Decision(step, True, "changed", config)
        recorded = {entry.inputs_sha256 for entry in entries} - {""}
        if recorded and (not all(path.is_file() for path in step.inputs)
                         or recorded != {inputs_fingerprint(step.inputs)}):
            return Decision(step, True, "inputs", config)
        return Decision(step, False, "done", config)

    def execute(self, plan: Sequence[Step], decisions: Optional[list[Decision]] = None) -> list[Step]:
        """Run (or skip) every step of ``plan``; returns the steps that ran.

        A stage that was interrupted continues from its last checkpoint; one that must run again because the
        user asked, or because an earlier stage ran again, starts from scratch.
        """
        decisions = self.decide(plan) if decisions is None else decisions
        if is_global_zero():  # what a kill left mid-write under a temporary name (never under a final name)
            for stale in self.run.root.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
        ran: list[Step] = []
        started_run = time.perf_counter()
        progress_of = RunProgress([step_kind(decision.step) for decision in decisions if decision.runs])
        for position, decision in enumerate(decisions, start=1):
            step = decision.step
            progress = f"[dcccl {self.name} {position}/{len(decisions)}] {step.label}"

            def fields(position: int = position, label: str = step.label) -> dict[str, object]:
                return {PROGRESS_FIELD: progress_of.fields(position, len(decisions), label,
                                                           time.perf_counter() - started_run)}

            if not decision.runs:
                log.info("%s: done already, skipped (%s)", progress, step.outputs[0], extra=fields())
                if is_global_zero() and self.manifest.entry(step.outputs[0]) is None:
                    self._record(step, decision.config_sha256)  # adopt what a kill left unrecorded
                continue
            if decision.why == "changed":
                log.info("%s: its config changed since it ran; running it and every later stage again", progress)
            elif decision.why == "inputs":
                log.info("%s: an artifact it reads was made again; running it and every later stage again", progress)
            started = time.perf_counter()
            self._run(step, decision, progress, fields())
            seconds = time.perf_counter() - started
            progress_of.finished(seconds)
            left = progress_of.time_left
            estimate = f", about {format_seconds(left)} left" if left is not None and progress_of.done < len(
                progress_of.kinds) else ""
            log.info("%s: finished in %.1f s (run so far %s%s)", progress, seconds,
                     format_seconds(time.perf_counter() - started_run), estimate, extra=fields())
            missing = [str(path) for path in step.outputs if not path.is_file()]
            if missing:
                raise StageFailedError(f"stage {step.label!r} finished but did not write {', '.join(missing)}")
            if is_global_zero():
                self._record(step, decision.config_sha256)
            ran.append(step)
            self._report(step, progress)
        return ran

    def _run(self, step: Step, decision: Decision, progress: str, fields: dict[str, object]) -> None:
        if isinstance(step, LocalStep):
            log.info("%s: running", progress, extra=fields)
            step.run()
            barrier()
            return
        if not isinstance(step, StageCall):
            raise TypeError(f"cannot run a {type(step).__name__}")
        if self.before_stage is not None:
            self.before_stage(step)
        fresh = decision.why != "missing"
        resume = self._prepare_stage_dir(step, decision.config_sha256, fresh)
        resumed = f" (resuming from {step.last_checkpoint})" if resume else ""
        log.info("%s: running %s %s%s", progress, step.command, origin_of(step.config_files[-1]), resumed, extra=fields)
        self.runner(step, resume)

    def _record(self, step: Step, config: str) -> None:
        self.manifest.record(step.outputs, step.label, config, inputs_fingerprint(step.inputs),
                             recorded_lineages(step.outputs))

    @staticmethod
    def _report(step: Step, progress: str) -> None:
        if isinstance(step, StageCall) and step.stage == "evaluate":
            served = json.loads(step.outputs[0].read_text()).get("served/acc")
            log.info("%s: served accuracy %s", progress, "n/a" if served is None else f"{100 * served:.1f}%")

    def _prepare_stage_dir(self, call: StageCall, config: str, fresh: bool) -> bool:
        """Whether ``call`` continues an interrupted start with the same config from its last checkpoint.

        A start with another config (or a forced one) removes the old checkpoints and progress records (before the
        new start is recorded, so every rank that reads the record finds them gone). The same start keeps its
        progress records even without a checkpoint: a device stage killed mid-round skips the devices it finished.
        """
        state = RunDirectory.stage_state(call.work_dir)
        key = f"{config}:{inputs_fingerprint(call.inputs)}"
        same_start = not fresh and state.is_file() and json.loads(state.read_text()).get("config_sha256") == key
        if same_start and call.last_checkpoint.is_file():
            return True
        barrier()  # every rank has read the record before rank zero replaces it
        if is_global_zero():
            shutil.rmtree(call.last_checkpoint.parent, ignore_errors=True)
            if not same_start:
                shutil.rmtree(RunDirectory.stage_progress(call.work_dir), ignore_errors=True)
            atomic_write_json(state, {"stage": call.label, "config_sha256": key})
        barrier()
        return False
