"""What a finished plan leaves in its run directory besides the artifacts: ``metrics.json`` (the last evaluation plus
a per-round history), ``transfers.json`` (the ledger), per-round ``fleet.json`` and the plots."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.manifest import Manifest, fingerprint
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.federated.attacks import Attack
from dcccl.federated.device_report import DeviceReport, finished_reports
from dcccl.federated.ledger import Ledger
from dcccl.pipeline.fusion import FusionStep
from dcccl.pipeline.settings import PipelineSettings
from dcccl.pipeline.steps import StageCall, Step
from dcccl.ranks import is_global_zero
from dcccl.reporting.plots import plot_accuracy_per_round, plot_confusion_matrix

CONFUSION_KEY = "served/confusion_matrix"


def evaluations(plan: Sequence[Step]) -> list[StageCall]:
    """The plan's evaluations, in order."""
    return [step for step in plan if isinstance(step, StageCall) and step.stage == "evaluate"]


def device_reports(call: StageCall) -> dict[int, DeviceReport]:
    """What each device of a finished device call reported (its progress record), by device."""
    return {report.device: report for report in finished_reports(call.work_dir, [task.device for task in call.devices])}


def refused_replies(plan: Sequence[Step]) -> dict[tuple[int, int], str]:
    """``(round, device) -> reason`` for every device copy a fusion of the plan refused (device ``-1``: a round's
    secure sum)."""
    refused = {}
    for step in plan:
        if isinstance(step, FusionStep) and step.reply_verdicts is not None and step.reply_verdicts.is_file():
            for verdict in json.loads(step.reply_verdicts.read_text())["replies"]:
                if not verdict["accepted"]:
                    refused[(int(verdict["round"]), int(verdict["device"]))] = str(verdict["reason"])
    return refused


def ledger_of(plan: Sequence[Step]) -> Ledger:
    """Every transfer the plan's device stages make: what goes down before each, what comes up after it."""
    ledger = Ledger()
    refused = refused_replies(plan)
    for step in plan:
        if not (isinstance(step, StageCall) and step.stage == "device"):
            continue
        # What a device reported besides its copy (its epsilon, its encoded bytes): read only when it reports any.
        reported = step.secure_sum is not None or any(step.model_args.get(key) for key in ("privacy", "compression"))
        reports = device_reports(step) if reported else {}
        attack = Attack(**step.model_args["attack"]) if step.model_args.get("attack") is not None else None
        attacked = set(attack.attacked(int(step.data_args.get("num_devices", 1)), step.seed)) if attack else set()
        first = len(ledger.transfers)
        for task in step.devices:
            report = reports.get(task.device)
            wire = report.wire if report is not None else None  # compressed: the bytes the encoding took
            down_bytes, up_bytes = (wire.down_bytes, wire.up_bytes) if wire is not None else (None, None)
            for path in task.downlink:
                ledger.record_file(step.round_index, task.device, "down", path,
                                   down_bytes if path == task.start else None)
            for path in task.uplink:
                reason = refused.get((step.round_index, task.device), refused.get((step.round_index, -1)))
                if reason is not None:
                    ledger.record_refused(step.round_index, task.device, path, reason)
                    continue
                ledger.record_file(step.round_index, task.device, "up", path, up_bytes)
                ledger.record_sample_count(step.round_index, task.device)
                if step.model_args.get("report_class_counts"):
                    ledger.record_class_counts(step.round_index, task.device, path)
            if report is not None and report.privacy is not None:
                ledger.record_epsilon(step.round_index, task.device, report.privacy.epsilon)
        if attack is not None and attacked:
            ledger.transfers[first:] = [replace(t, attacked=attack.kind) if t.device in attacked else t
                                        for t in ledger.transfers[first:]]
    return ledger


def privacy_summary(ledger: Ledger) -> dict[str, Any]:
    """The epsilon each device has spent by the end of the run (its last report), their largest and mean value."""
    spent: dict[int, float] = {}
    for transfer in ledger.transfers:
        if transfer.what == "epsilon" and transfer.value is not None:
            spent[transfer.device] = transfer.value
    if not spent:
        return {}
    return {"privacy/epsilon_max": max(spent.values()), "privacy/epsilon_mean": sum(spent.values()) / len(spent),
            "privacy/epsilon_per_device": {str(device): spent[device] for device in sorted(spent)}}


def round_history(plan: Sequence[Step]) -> list[dict[str, Any]]:
    """What each evaluation wrote, with its round."""
    return [{"round": call.round_index, **json.loads(call.outputs[0].read_text())} for call in evaluations(plan)]


def summarize(history: list[dict[str, Any]], ledger: Ledger) -> dict[str, Any]:
    """``metrics.json``: the last evaluation's figures, the per-round history (without confusion matrices), the
    served accuracy per round and the transfer totals."""
    history = [{k: v for k, v in entry.items() if k != CONFUSION_KEY} for entry in history]
    final = {key: value for key, value in history[-1].items() if key != "round"}
    totals = ledger.totals()
    return {
        **final,
        "rounds": history,
        "served/acc_per_round": [entry["served/acc"] for entry in history],
        "transfers/downlink_bytes": totals["downlink_bytes"],
        "transfers/uplink_bytes": totals["uplink_bytes"],
        "transfers/per_round": totals["per_round"],
        **privacy_summary(ledger),
    }


def run_fingerprint(settings: PipelineSettings, plan: Sequence[Step]) -> str:
    """Hash of the fingerprints of every step of the plan and of the settings no step holds (the device budget):
    what ``metrics.json`` is recorded with."""
    run = settings.run
    budget = None if settings.device_budget is None else vars(settings.device_budget)
    parts = "".join(fingerprint(step.describe(), run.root) for step in plan) + json.dumps(budget, sort_keys=True)
    return hashlib.sha256(parts.encode()).hexdigest()


def metrics_are_current(settings: PipelineSettings, plan: Sequence[Step], manifest: Manifest) -> bool:
    """Whether ``metrics.json`` and ``transfers.json`` were written from this very plan (nothing to redo)."""
    run = settings.run
    expected = run_fingerprint(settings, plan)
    return all(path.is_file() and (entry := manifest.entry(path)) is not None and entry.config_sha256 == expected
               for path in (run.metrics, run.transfers))


def write_fleet_state(settings: PipelineSettings, run: RunDirectory) -> None:
    """Per round: who was sampled, online and reported, and which copies the fusion averaged."""
    fleet, seed, rule = settings.fleet, settings.seed_everything, settings.rule
    for r in range(1, settings.rounds + 1):
        atomic_write_json(run.round_dir(r) / "fleet.json", {
            "sampled": fleet.sampled(seed, r),
            "online": sorted(fleet.online(seed, r)),
            "reported": fleet.reporting(seed, r),
            "aggregation": type(rule).__name__,
            "fused_copies": [{"device": d, "round": rr} for d, rr in rule.fused_copies(fleet, seed, r)],
        })


def write_run_outputs(settings: PipelineSettings, plan: Sequence[Step], run: RunDirectory,
                      metrics: dict[str, Any], confusion: Any, ledger: Ledger, fleet_state: bool = True) -> None:
    """Write ``metrics.json``, ``transfers.json``, the plots and (with ``fleet_state``) each round's ``fleet.json``
    (global rank zero only), and record the two JSON files in the manifest."""
    if not is_global_zero():
        return
    ledger.save(run.transfers)
    if fleet_state:
        write_fleet_state(settings, run)
    plot_accuracy_per_round(metrics["rounds"], run.accuracy_plot)
    if confusion is not None:
        plot_confusion_matrix(confusion, run.confusion_plot)
    atomic_write_json(run.metrics, metrics)
    Manifest(run.manifest).record((run.metrics, run.transfers), "pipeline", run_fingerprint(settings, plan))


def collect_metrics(settings: PipelineSettings, plan: Sequence[Step], run: RunDirectory) -> dict[str, Any]:
    """Merge the plan's evaluations and ledger into ``metrics.json`` (and the other outputs); returns it."""
    history = round_history(plan)
    ledger = ledger_of(plan)
    metrics = summarize(history, ledger)
    refused = [t for t in ledger.transfers if t.refused is not None]
    if refused:
        metrics["replies/refused"] = len(refused)
    if settings.privacy is not None:
        metrics["privacy/delta"] = settings.privacy.delta
    write_run_outputs(settings, plan, run, metrics, history[-1].get(CONFUSION_KEY), ledger)
    return metrics


def read_metrics(run: RunDirectory) -> dict[str, Any]:
    """The ``metrics.json`` of a finished run."""
    return json.loads(Path(run.metrics).read_text())
