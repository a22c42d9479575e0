"""How DC-CCL stands against the other methods of one comparison: the three questions a user asks of it.

Every check reads ``comparison.json``'s per-seed accuracies, so ``dcccl compare`` answers them on the user's own
data, with the seeds it ran:

- does DC-CCL beat every privacy-preserving baseline, on every seed?
- how much of the centralized model's accuracy on the device-only classes does the served model reach?
- how far is its overall accuracy below the centralized model's?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

METHOD = "dcccl"
UPPER_BOUND = "centralized"
DEVICE_SHARE_TARGET = 0.9
OVERALL_GAP_TARGET = 0.03


@dataclass(frozen=True)
class Target:
    """One target: what is asked, whether it is met, and the figure that says so."""

    name: str
    met: bool
    figure: str


def _per_seed(comparison: dict[str, Any], method: str, key: str) -> dict[str, float]:
    return {seed: values[key] for seed, values in comparison[method].get("per_seed", {}).items()
            if values.get(key) is not None}


def beats_baselines(comparison: dict[str, Any]) -> Optional[Target]:
    """DC-CCL's accuracy above every privacy-preserving baseline's on every seed (None without baselines)."""
    baselines = [m for m in comparison["methods"] if m != METHOD and not comparison[m]["privacy_violating"]]
    ours = _per_seed(comparison, METHOD, "acc")
    if not baselines or not ours:
        return None
    margins = []
    for seed, accuracy in ours.items():
        best = max((_per_seed(comparison, m, "acc").get(seed, float("-inf")), m) for m in baselines)
        margins.append((accuracy - best[0], seed, best[1]))
    worst, seed, rival = min(margins)
    figure = f"smallest lead {100 * worst:+.1f} points, on seed {seed}, over {comparison[rival]['title']}"
    return Target("above every privacy-preserving baseline on every seed", worst > 0, figure)


def device_share(comparison: dict[str, Any]) -> Optional[Target]:
    """Served accuracy on the device-only classes at least 90% of the centralized model's (means over seeds)."""
    if UPPER_BOUND not in comparison["methods"]:
        return None
    ours, bound = comparison[METHOD]["acc_device_classes"], comparison[UPPER_BOUND]["acc_device_classes"]
    if ours is None or not bound:
        return None
    share = ours / bound
    figure = f"{100 * ours:.1f}% against {100 * bound:.1f}%: {100 * share:.0f}% of it"
    return Target("device-only classes at least 90% of the centralized model's", share >= DEVICE_SHARE_TARGET,
                  figure)


def overall_gap(comparison: dict[str, Any]) -> Optional[Target]:
    """Overall accuracy within 3 points of the centralized model's (means over seeds)."""
    if UPPER_BOUND not in comparison["methods"]:
        return None
    ours, bound = comparison[METHOD]["acc"], comparison[UPPER_BOUND]["acc"]
    if ours is None or bound is None:
        return None
    gap = bound - ours
    figure = f"{100 * ours:.1f}% against {100 * bound:.1f}%: {100 * gap:.1f} points below"
    return Target("overall accuracy within 3 points of the centralized model's", gap <= OVERALL_GAP_TARGET, figure)


def targets(comparison: dict[str, Any]) -> list[Target]:
    """Every target the comparison can answer (one needs baselines, two need the centralized model)."""
    if METHOD not in comparison["methods"]:
        return []
    checks = (beats_baselines(comparison), device_share(comparison), overall_gap(comparison))
    return [check for check in checks if check is not None]


def target_lines(comparison: dict[str, Any]) -> list[str]:
    """Markdown lines, one per target: met or missed, and the figure."""
    return [f"- {'met' if t.met else 'missed'}: {t.name} ({t.figure})" for t in targets(comparison)]
