"""The comparison's outputs: ``comparison.json``, a markdown table and PNG plots, all from one dict."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dcccl.artifacts.atomic import atomic_write_json, atomic_write_text
from dcccl.methods.method import Method
from dcccl.methods.targets import target_lines

ACCURACY_KEYS = ("acc", "acc_cloud_classes", "acc_device_classes")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_comparison(results: dict[int, dict[str, dict[str, Any]]], costs: dict[str, dict[str, Any]],
                     fidelity: dict[int, dict[str, dict[str, float]]], methods: Sequence[Method]) -> dict[str, Any]:
    """Assemble ``comparison.json``: per method the accuracies (mean and std over seeds) and cost figures.

    Args:
        results: ``{seed: {method name: metrics}}``.
        costs: ``{method name: cost figures}`` from each method's ``costs``.
        fidelity: ``{seed: {"cloud_test": {...}, "device_test": {...}}}`` of the DC-CCL control model.
        methods: The compared methods, in table order.
    """
    seeds = sorted(results)
    comparison: dict[str, Any] = {"methods": [method.name for method in methods]}
    for method_entry in methods:
        method = method_entry.name
        entry: dict[str, Any] = {"title": method_entry.title, "privacy_violating": method_entry.privacy_violating,
                                 "per_round": method_entry.per_round}
        for key in ACCURACY_KEYS:
            values = [results[s][method].get(f"served/{key}") for s in seeds]
            if any(v is None for v in values):
                entry[key], entry[f"{key}_std"] = None, None
                continue
            entry[key], entry[f"{key}_std"] = _mean_std([float(v) for v in values if v is not None])
        entry["per_seed"] = {str(s): {key: results[s][method].get(f"served/{key}") for key in ACCURACY_KEYS}
                             for s in seeds}
        entry.update(costs[method])
        comparison[method] = entry
    comparison["control_fidelity"] = {
        split: {metric: statistics.fmean(fidelity[s][split][metric] for s in seeds)
                for metric in ("agreement", "logit_mse")}
        for split in ("cloud_test", "device_test")
    }
    comparison["served_acc_per_round"] = {
        method.name: [statistics.fmean(per_seed) for per_seed in zip(*(results[s][method.name]["served/acc_per_round"]
                                                                       for s in seeds))]
        for method in methods if method.per_round
    }
    comparison["seeds"] = seeds
    return comparison


def _pct(entry: dict[str, Any], key: str, with_std: bool) -> str:
    value = entry.get(key)
    if value is None:
        return "n/a"
    return f"{100 * value:.1f} ± {100 * entry[f'{key}_std']:.1f}" if with_std else f"{100 * value:.1f}"


def _scaled(value: float, unit: str, base: float = 1000.0) -> str:
    """``value`` with a metric prefix: 6274 -> '6.27 k', 25568 bytes -> '25.6 kB'."""
    if value == 0:
        return "0"
    for prefix, scale in (("G", base**3), ("M", base**2), ("k", base)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.0f} {unit}".strip()


def markdown_table(comparison: dict[str, Any]) -> str:
    """A markdown table of every method (accuracy in percent, costs of what runs on the device)."""
    with_std = len(comparison["seeds"]) > 1
    header = ("| Method | Acc (%) | Cloud classes (%) | Device-only classes (%) | Train sample passes "
              "| On-device params | Train FLOPs / sample | Peak train memory | Down / round | Up / round | Down once "
              "| Up once |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method in comparison["methods"]:
        entry = comparison[method]
        title = entry["title"] + (" ⚠" if entry["privacy_violating"] else "")
        cells = [_pct(entry, key, with_std) for key in ACCURACY_KEYS]
        passes = entry.get("train_sample_passes")
        cells += ["n/a" if passes is None else _scaled(passes, "")]
        cells += [_scaled(entry["device_params"], ""), _scaled(entry["device_train_flops_per_sample"], "FLOP")]
        cells += [_scaled(entry[key], "B") for key in ("device_peak_train_memory_bytes", "downlink_bytes_per_round",
                                                        "uplink_bytes_per_round", "downlink_bytes_once",
                                                        "uplink_bytes_once")]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    seeds = ", ".join(str(s) for s in comparison["seeds"])
    fidelity = comparison["control_fidelity"]
    notes = [
        "",
        f"Seeds: {seeds}" + (" (mean ± std)." if with_std else "."),
        "⚠ The centralized model needs every raw device sample on the cloud: an upper bound, not a deployable method.",
        "On-device figures cover what trains on the device (DC-CCL: frozen control model + co-submodel); "
        "FLOPs and memory are of one training step with the device's batch.",
        "Train sample passes: training samples through a training step, over every stage that trained the served "
        "model (first seed); every stage follows its stage config's budget (floors, caps, early stopping).",
        f"Control-model fidelity (agreement / logit MSE with the cloud submodel): cloud test samples "
        f"{100 * fidelity['cloud_test']['agreement']:.1f}% / {fidelity['cloud_test']['logit_mse']:.3f}, "
        f"device test samples {100 * fidelity['device_test']['agreement']:.1f}% / "
        f"{fidelity['device_test']['logit_mse']:.3f}.",
    ]
    checks = target_lines(comparison)
    if checks:
        notes += ["", "DC-CCL's targets:", *checks]
    return "\n".join(lines + notes) + "\n"


def plot_accuracy(comparison: dict[str, Any], path: Path) -> None:
    """Grouped bars: accuracy of every method on all, cloud and device-only classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.27
    labels = {"acc": "all classes", "acc_cloud_classes": "cloud classes", "acc_device_classes": "device-only classes"}
    methods = comparison["methods"]
    for i, key in enumerate(ACCURACY_KEYS):
        values = [100 * (comparison[m][key] or 0.0) for m in methods]
        errors = [100 * (comparison[m][f"{key}_std"] or 0.0) for m in methods]
        xs = [j + (i - 1) * width for j in range(len(methods))]
        ax.bar(xs, values, width, yerr=errors if any(errors) else None, label=labels[key], capsize=3)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([comparison[m]["title"].replace(" (", "\n(") for m in methods], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy per method on the union test set")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rounds(comparison: dict[str, Any], path: Path) -> None:
    """Served accuracy after every round: DC-CCL against the round-based baselines and the fixed references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, values in comparison["served_acc_per_round"].items():
        ax.plot(range(1, len(values) + 1), [100 * v for v in values], marker="o", label=comparison[method]["title"])
    references = [m for m in comparison["methods"] if not comparison[m]["per_round"]]
    for method, style in zip(references, (":", "--", "-.", (0, (1, 4)))):
        ax.axhline(100 * comparison[method]["acc"], linestyle=style, color="grey", label=comparison[method]["title"])
    ax.set_xlabel("round")
    ax.set_ylabel("served accuracy (%)")
    ax.set_ylim(0, 100)
    rounds = max((len(values) for values in comparison["served_acc_per_round"].values()), default=1)
    ax.set_xticks(range(1, rounds + 1))
    ax.set_title("Served accuracy per round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(comparison: dict[str, Any], root: Path) -> dict[str, Path]:
    """Write ``comparison.json``, ``comparison.md`` and the two plots into ``root``; returns their paths."""
    paths = {
        "json": root / "comparison.json",
        "markdown": root / "comparison.md",
        "accuracy_plot": root / "comparison_accuracy.png",
        "rounds_plot": root / "comparison_rounds.png",
    }
    atomic_write_json(paths["json"], comparison)
    atomic_write_text(paths["markdown"], markdown_table(comparison))
    plot_accuracy(comparison, paths["accuracy_plot"])
    plot_rounds(comparison, paths["rounds_plot"])
    return paths
