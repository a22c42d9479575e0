"""``dcccl audit``: a loss-threshold membership-inference attack on every device copy a run uploaded.

For each copy the attacker is whoever receives it (the cloud, which also holds the control model): it computes the
loss of the guided logits ``control(x) + copy(x)`` (the copy's own logits when devices train unguided) on the device's
training samples (members) and on device-side samples no device trained on (the held-out tenth and the device-side
test samples: non-members), matched class by class. ``membership.json`` holds each copy's AUC, each round's mean and
the run's epsilon; ``membership_roc.png`` the last round's ROC curves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse import ActionYesNo, ArgumentParser
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.exports import load_network
from dcccl.artifacts.run_dir import RunDirectory
from dcccl.commands.pipeline import datamodule_of, pipeline_parser, settings_from
from dcccl.errors import ConfigError
from dcccl.federated.membership import class_matched, loss_threshold_auc, roc_points
from dcccl.pipeline.metrics import read_metrics
from dcccl.pipeline.plan import dcccl_plan
from dcccl.pipeline.steps import StageCall, Step
from dcccl.reporting.plots import plot_membership_roc

log = logging.getLogger("dcccl")

MEMBERSHIP = "membership.json"
MEMBERSHIP_PLOT = "membership_roc.png"


@torch.no_grad()
def per_sample_losses(copy: nn.Module, guide: Optional[nn.Module], loader: Any) -> tuple[torch.Tensor, np.ndarray]:
    """The cross-entropy of ``guide(x) + copy(x)`` on every sample of ``loader``, and the samples' labels."""
    copy.eval()
    if guide is not None:
        guide.eval()
    losses, labels = [], []
    for x, y in loader:
        logits = copy(x) if guide is None else guide(x) + copy(x)
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        labels.append(y.numpy())
    return torch.cat(losses), np.concatenate(labels)


def nonmember_dataset(datamodule: Any) -> Dataset:
    """Device-side samples no device trained on: the held-out tenth and the device-side test samples."""
    parts = [part for part in (datamodule.data.device_val, datamodule.side_test_dataset("device"))
             if part is not None and len(part) > 0]
    return ConcatDataset(parts)


def audit_membership(plan: Sequence[Step], datamodule: Any, run_root: Path, guided: bool, seed: int,
                     limit: int = 1000) -> dict[str, Any]:
    """Attack every device copy of ``plan``; writes ``membership.json`` and the ROC plot, returns the report.

    Args:
        plan: The run's plan (its device calls name the copies and the control model).
        datamodule: The run's DataModule (each device's samples, the held-out ones).
        run_root: The run directory.
        guided: Whether the devices trained under the control model (the attack then adds its logits).
        seed: Seed of the class-matched draw.
        limit: At most this many members (and as many non-members) per copy.
    """
    datamodule.setup("fit")
    pool = nonmember_dataset(datamodule)
    pool_loader = datamodule.sequential_loader(pool)
    rounds: list[dict[str, Any]] = []
    curves: dict[int, tuple[list[float], list[float]]] = {}
    aucs: dict[int, float] = {}
    guide_cache: dict[str, nn.Module] = {}
    for step in plan:
        if not (isinstance(step, StageCall) and step.stage == "device"):
            continue
        if step.secure_sum is not None:
            raise ConfigError(f"{run_root} used secure aggregation: the cloud holds only the mean of each round's "
                              "copies, no device copy to attack")
        control = step.model_args.get("control_model") if guided else None
        if control is not None and control not in guide_cache:
            guide_cache[control] = load_network(control, "control_model")
        guide = guide_cache.get(control) if control is not None else None
        per_device: dict[str, float] = {}
        counts: dict[str, int] = {}
        curves, aucs = {}, {}
        for task in step.devices:
            copy = load_network(task.export, "co_submodel")
            members_data = datamodule.device_dataset(task.device)
            member_losses, member_labels = per_sample_losses(copy, guide, datamodule.sequential_loader(members_data))
            pool_losses, pool_labels = per_sample_losses(copy, guide, pool_loader)
            mine, theirs = class_matched(member_labels, pool_labels, seed + task.device, limit)
            if len(mine) == 0:
                continue
            auc = loss_threshold_auc(member_losses[mine], pool_losses[theirs])
            per_device[str(task.device)], counts[str(task.device)] = auc, int(len(mine))
            aucs[task.device] = auc
            curves[task.device] = roc_points(member_losses[mine], pool_losses[theirs])
        if per_device:
            values = list(per_device.values())
            rounds.append({"round": step.round_index, "auc_mean": float(np.mean(values)),
                           "auc_max": float(np.max(values)), "auc_per_device": per_device, "pairs": counts})
            log.info("[dcccl] round %d: membership AUC %.3f (mean of %d copies, max %.3f)", step.round_index,
                     rounds[-1]["auc_mean"], len(values), rounds[-1]["auc_max"])
    if not rounds:
        raise ValueError("the run uploaded no device copy to attack")
    metrics = read_metrics_if_any(run_root)
    report = {"attack": "loss threshold, class-matched members and non-members", "auc": rounds[-1]["auc_mean"],
              "auc_max": rounds[-1]["auc_max"], "rounds": rounds,
              **{key: value for key, value in metrics.items() if key.startswith("privacy/")}}
    atomic_write_json(run_root / MEMBERSHIP, report)
    plot_membership_roc(curves, aucs, run_root / MEMBERSHIP_PLOT,
                        title=f"Membership inference, round {rounds[-1]['round']} copies")
    return report


def read_metrics_if_any(run_root: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` (empty when the run has none yet)."""
    run = RunDirectory(run_root)
    return read_metrics(run) if run.metrics.is_file() else {}


AUDIT_HELP = """Attack every device copy a finished pipeline run uploaded with a loss-threshold membership-inference
attack: the loss of control(x) + copy(x) on the device's training samples against device-side samples no device
trained on, matched class by class. Writes membership.json (each copy's AUC, each round's mean, the run's epsilon)
and membership_roc.png in the run directory; AUC 0.5 means the copies give nothing away."""


def audit_parser() -> ArgumentParser:
    """The parser of ``dcccl audit``."""
    parser = ArgumentParser(prog="dcccl audit", description=AUDIT_HELP, exit_on_error=False)
    parser.add_argument("--run_dir", type=str, required=True, help="A finished pipeline run directory.")
    parser.add_argument("--samples", type=int, default=1000,
                        help="At most this many training samples (and as many held-out ones) per copy.")
    parser.add_argument("--debug", action=ActionYesNo, default=False, help="Show full tracebacks on errors.")
    return parser

def audit_main(argv: list[str]) -> dict[str, Any]:
    """``dcccl audit``: the membership-inference attack on a finished run's device copies."""
    cfg = audit_parser().parse_args(argv)
    run = RunDirectory(cfg.run_dir)
    if not run.pipeline_config.is_file() or not run.metrics.is_file():
        raise ConfigError(f"{cfg.run_dir} holds no finished pipeline run (no pipeline.yaml and metrics.json): run "
                          "dcccl pipeline first, then audit its --run_dir")
    if cfg.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {cfg.samples}")
    parser = pipeline_parser()
    settings = settings_from(parser, parser.parse_path(str(run.pipeline_config)))
    settings.run_dir = str(run.root)
    report = audit_membership(dcccl_plan(settings), datamodule_of(settings), run.root,
                              settings.device_guide == "control_model", settings.seed_everything, cfg.samples)
    epsilon = report.get("privacy/epsilon_max")
    spent = f" at epsilon {epsilon:.2f} (delta {report['privacy/delta']:g})" if epsilon is not None else " (no DP)"
    print(f"membership inference on the last round's copies{spent}: AUC {report['auc']:.3f} (mean over devices, "
          f"max {report['auc_max']:.3f}; 0.5 = chance) -> {run.root / MEMBERSHIP}")
    return report
