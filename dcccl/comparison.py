"""The paper's comparison: DC-CCL against its baselines on the same data partition and seed.

Every method is a pipeline run (or a variant of one) through the same stages; nothing here trains a
network itself. Each method gets its own run directory under the DC-CCL run, reuses what the DC-CCL run
already produced (the cloud submodel, the initial co-submodel) and skips what it finished before.

Methods:

- ``cloud_only``: the cloud submodel alone (from the DC-CCL run; no extra training);
- ``small_fedavg``: a model of the co-submodel's size trained with FedAvg on cloud and device samples;
- ``device_only``: the co-submodel trained on device samples alone;
- ``dcccl_no_control``: DC-CCL with unguided device training (ablation of the control model);
- ``dcccl``: the pipeline as configured;
- ``centralized``: the whole model trained on all samples pooled (upper bound, violates privacy).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dcccl.atomic import atomic_write_bytes, atomic_write_json
from dcccl.costs import parameter_count, peak_training_memory_bytes, state_dict_bytes, training_flops_per_sample
from dcccl.exports import load_network
from dcccl.freeze import freeze
from dcccl.pipeline import Pipeline, RestartPoint, StageCall, StageRunner
from dcccl.ranks import is_global_zero

log = logging.getLogger("dcccl")

METHODS: tuple[str, ...] = ("cloud_only", "small_fedavg", "device_only", "dcccl_no_control", "dcccl", "centralized")
SAMPLE_COUNT_BYTES = 8  # the int64 sample count a device uploads with its co-submodel copy
METHOD_TITLES: dict[str, str] = {
    "cloud_only": "Cloud-only model",
    "small_fedavg": "Device-affordable small model (FedAvg)",
    "device_only": "On-device only",
    "dcccl_no_control": "DC-CCL without control model",
    "dcccl": "DC-CCL",
    "centralized": "Centralized (privacy-violating upper bound)",
}


class DeviceOnlyBaseline(Pipeline):
    """The co-submodel trained on one device's samples alone, round after round, never fused.

    With a fleet every device trains its own model on its own share (no device needs the network, so all of
    them train in every round) and the reported metrics are the mean over the devices' models, each evaluated
    on the union test set; ``per_device`` in its metrics lists them one by one.
    """

    def plan(self) -> Iterator[tuple[RestartPoint, StageCall]]:
        """Per device: device stages chained through their own copies, then an evaluation of the last copy."""
        for device in range(self.fleet.num_devices):
            start = self.run.initial_co_submodel
            for r in range(1, self.rounds + 1):
                copy = self.run.device_copy(r, device)
                call = self._call("device", "fit", {
                    "control_model": None, "co_submodel": str(start), "export_path": str(copy),
                }, (copy,), f"round {r}/{self.rounds}: device {device} alone", r)
                if self.fleet.num_devices > 1:
                    call.data_args["device_index"] = device
                call.device = device
                yield "rounds", call
                start = copy
            label = "evaluation" if self.fleet.num_devices == 1 else f"evaluation of device {device}"
            yield "rounds", self.evaluation_call(start, self.evaluation_paths()[device], label)

    def evaluation_paths(self) -> list[Path]:
        """One evaluation per device, after the last round."""
        if self.fleet.num_devices == 1:
            return [self.run.root / "evaluate" / "metrics.json"]
        return [self.run.root / "evaluate" / f"device_{device:03d}" / "metrics.json"
                for device in range(self.fleet.num_devices)]

    def collect_metrics(self) -> dict[str, Any]:
        """One device: as the pipeline reports it. A fleet: the mean over the devices' models."""
        if self.fleet.num_devices == 1:
            return super().collect_metrics()
        per_device = [json.loads(path.read_text()) for path in self.evaluation_paths()]
        mean = {key: statistics.fmean(entry[key] for entry in per_device)
                for key, value in per_device[0].items() if isinstance(value, (int, float))}
        metrics = {**mean, "rounds": [{"round": self.rounds, **mean}], "served/acc_per_round": [mean["served/acc"]],
                   "per_device": [{key: entry[key] for key in mean} for entry in per_device]}
        if is_global_zero():
            self.ledger.save(self.run.transfers)
            atomic_write_json(self.run.metrics, metrics)
        return metrics


class CentralizedBaseline(Pipeline):
    """Cloud submodel and co-submodel trained jointly on all samples pooled, then evaluated like DC-CCL."""

    @property
    def co_submodel(self) -> Path:
        """Where the jointly trained co-submodel is written."""
        return self.run.cloud_submodel.parent / "co_submodel.pt"

    def plan(self) -> Iterator[tuple[RestartPoint, StageCall]]:
        """One centralized stage, then the evaluation of ``f + h``."""
        yield "cloud", self._call("centralized", "fit", {
            "export_path": str(self.run.cloud_submodel), "co_export_path": str(self.co_submodel),
        }, (self.run.cloud_submodel, self.co_submodel), "centralized training on pooled samples")
        yield "cloud", self.evaluation_call(self.co_submodel, self.evaluation_paths()[0], "evaluation")

    def evaluation_paths(self) -> list[Path]:
        """One evaluation."""
        return [self.run.root / "evaluate" / "metrics.json"]


def _copy_if_missing(source: Path, target: Path) -> None:
    if source.is_file() and not target.is_file():
        atomic_write_bytes(target, source.read_bytes())


class Comparison:
    """Runs every method for every seed and collects their metrics.

    Args:
        settings: Keyword arguments of :class:`Pipeline` for the DC-CCL run (as ``dcccl pipeline`` takes them).
        seeds: Seeds to repeat the comparison with; default: the pipeline's own seed only.
    """

    def __init__(self, settings: dict[str, Any], seeds: Optional[list[int]] = None) -> None:
        self.settings = dict(settings)
        stages = self.settings["stages"]
        missing = [name for name in ("centralized", "fedavg_client") if getattr(stages, name) is None]
        if missing:
            raise ValueError(
                f"dcccl compare needs stage configs for {', '.join(missing)} in the pipeline config "
                "(stages.centralized, stages.fedavg_client; see configs/quickstart.yaml)"
            )
        self.seeds = list(seeds) if seeds else [int(self.settings.get("seed_everything", 0))]
        self.root = Path(self.settings.get("run_dir") or Path("runs") / self.settings.get("name", "dcccl"))

    def seed_dir(self, seed: int) -> Path:
        """Run directory of DC-CCL under ``seed`` (the run directory itself when there is one seed)."""
        return self.root if len(self.seeds) == 1 else self.root / "seeds" / f"seed_{seed}"

    def variants(self, seed: int) -> dict[str, Pipeline]:
        """The pipeline of every trained method under ``seed`` (``cloud_only`` comes from the DC-CCL run)."""
        base_dir = self.seed_dir(seed)
        common = {**self.settings, "seed_everything": seed}

        def at(method: str, **changes: Any) -> dict[str, Any]:
            return {**common, "run_dir": str(base_dir / "baselines" / method), "name": method, **changes}

        stages = common["stages"]
        fusion_args = list((common.get("stage_args") or {}).get("fusion", []))
        # FedAvg weights every copy by its sample count, the cloud's included.
        fedavg_fusion = fusion_args + ["--model.init_args.cloud_share=null"]
        fedavg_stage_args = {**(common.get("stage_args") or {}), "fusion": fedavg_fusion}
        return {
            "dcccl": Pipeline(**{**common, "run_dir": str(base_dir), "name": "dcccl"}),
            "dcccl_no_control": Pipeline(**at("dcccl_no_control", device_guide="none")),
            "small_fedavg": Pipeline(**at(
                "small_fedavg", stages=replace(stages, cloud_round=stages.fedavg_client), cloud_round_guide="none",
                device_guide="none", serve_cloud_submodel=False, stage_args=fedavg_stage_args)),
            "device_only": DeviceOnlyBaseline(**at("device_only", cloud_round_guide="none", device_guide="none",
                                                   serve_cloud_submodel=False)),
            "centralized": CentralizedBaseline(**at("centralized")),
        }

    def execute(self, runner: StageRunner) -> dict[int, dict[str, dict[str, Any]]]:
        """Run every method for every seed; returns ``{seed: {method: metrics}}``."""
        results: dict[int, dict[str, dict[str, Any]]] = {}
        for seed in self.seeds:
            variants = self.variants(seed)
            log.info("[dcccl compare] seed %d: %s", seed, ", ".join(METHODS))
            dcccl = variants["dcccl"]
            metrics = {"dcccl": dcccl.execute(runner)}
            # Reuse what DC-CCL trained: the same cloud submodel and the same starting co-submodel.
            _copy_if_missing(dcccl.run.cloud_submodel, variants["dcccl_no_control"].run.cloud_submodel)
            _copy_if_missing(dcccl.run.initial_co_submodel, variants["device_only"].run.initial_co_submodel)
            for method in ("dcccl_no_control", "small_fedavg", "device_only", "centralized"):
                metrics[method] = variants[method].execute(runner)
            metrics["cloud_only"] = {key.replace("cloud_only/", "served/"): value
                                     for key, value in metrics["dcccl"].items() if key.startswith("cloud_only/")}
            results[seed] = metrics
        return results


def method_costs(variants: dict[str, Pipeline], x: torch.Tensor, y: torch.Tensor,
                 device_sample_bytes: int) -> dict[str, dict[str, Any]]:
    """Cost figures of what each method runs on a device, measured on its exported networks.

    ``x``/``y`` is one device training batch; ``device_sample_bytes`` the size of all raw device training
    samples (what the centralized baseline uploads). Bytes per round count the co-submodel's state dict each way
    (plus the 8-byte sample count that goes up); DC-CCL also sends the control model down once. The
    centralized baseline trains nothing on the device but uploads every raw device training sample.
    """
    dcccl = variants["dcccl"].run
    cloud_submodel = load_network(dcccl.cloud_submodel, "cloud_submodel")
    control_model = freeze(load_network(dcccl.control_model, "control_model"))
    co_submodel = load_network(dcccl.initial_co_submodel, "co_submodel")
    small = load_network(variants["small_fedavg"].run.initial_co_submodel, "co_submodel")
    h_bytes, small_bytes = state_dict_bytes(co_submodel), state_dict_bytes(small)

    def on_device(trainable: nn.Module, guide: Optional[nn.Module] = None) -> dict[str, Any]:
        return {
            "device_params": parameter_count(trainable) + (parameter_count(guide) if guide is not None else 0),
            "device_train_flops_per_sample": training_flops_per_sample(trainable, x, y, guide),
            "device_peak_train_memory_bytes": peak_training_memory_bytes(trainable, x, y, guide),
        }

    nothing = {"device_params": 0, "device_train_flops_per_sample": 0.0, "device_peak_train_memory_bytes": 0}
    wire = dict.fromkeys(("downlink_bytes_once", "uplink_bytes_once", "downlink_bytes_per_round",
                          "uplink_bytes_per_round"), 0)
    per_round_h = {**wire, "downlink_bytes_per_round": h_bytes, "uplink_bytes_per_round": h_bytes + SAMPLE_COUNT_BYTES}
    f_h = parameter_count(cloud_submodel, co_submodel)
    return {
        "cloud_only": {**nothing, **wire, "model_params": parameter_count(cloud_submodel)},
        "small_fedavg": {**on_device(small), **wire, "downlink_bytes_per_round": small_bytes,
                         "uplink_bytes_per_round": small_bytes + SAMPLE_COUNT_BYTES,
                         "model_params": parameter_count(small)},
        "device_only": {**on_device(co_submodel), **wire, "model_params": parameter_count(co_submodel)},
        "dcccl_no_control": {**on_device(co_submodel), **per_round_h, "model_params": f_h},
        "dcccl": {**on_device(co_submodel, control_model), **per_round_h,
                  "downlink_bytes_once": state_dict_bytes(control_model), "model_params": f_h},
        "centralized": {**nothing, **wire, "uplink_bytes_once": device_sample_bytes,
                        "model_params": f_h},
    }
