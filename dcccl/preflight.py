"""Checks of a pipeline run made before it writes anything, so that bad input leaves a run directory as it was.

What the data and the stage configs say is checked by their owners (the DataModule, the backbone registry,
the stage parser); what is checked here is how they meet the run directory: the artifacts a re-run would reuse
must fit the data, and the on-device part must fit the device budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from dcccl.backbones.spec import BackboneSpec
from dcccl.budget import check_device_budget
from dcccl.exports import check_export_fits, load_network
from dcccl.pipeline import Pipeline


def check_reused_exports(pipeline: Pipeline, num_classes: int, in_chans: int) -> list[Path]:
    """Refuse a run directory whose kept exports were trained for other data; returns the kept artifacts.

    Raises:
        ExportError: A kept export is unreadable, or predicts another number of classes, or reads another number
            of channels.
    """
    reused = pipeline.reused_outputs()
    for path in reused:
        if path.suffix == ".pt":
            check_export_fits(path, num_classes, in_chans, advice=f"the run directory {pipeline.run.root} holds a "
                              "run on other data; use another --run_dir, or --force to train every stage again")
    return reused


def _network(kept: Optional[Path], role: Any, spec: Optional[BackboneSpec], num_classes: int,
             in_chans: int) -> Optional[nn.Module]:
    if kept is not None:
        return load_network(kept, role)
    return spec.without_weights().build(num_classes, in_chans) if spec is not None else None


def check_budget_before_running(pipeline: Pipeline, reused: list[Path], control_spec: Optional[BackboneSpec],
                                co_spec: Optional[BackboneSpec], sample_shape: tuple[int, ...], num_classes: int,
                                in_chans: int) -> Optional[dict[str, Any]]:
    """Measure the on-device part against the device budget before any stage runs; returns the figures.

    The control model and the co-submodel are the kept exports where the run directory has them, otherwise
    built untrained from their backbone specs (the budget depends on the architecture only). When a network
    is neither kept nor described by a spec, nothing is checked here: :meth:`Pipeline.execute` still checks
    the exports before the first device trains.

    Raises:
        DeviceBudgetExceeded: The on-device part does not fit; the message names every figure over its limit.
    """
    if pipeline.device_budget is None:
        return None
    run = pipeline.run
    co_submodel = _network(run.initial_co_submodel if run.initial_co_submodel in reused else None, "co_submodel",
                           co_spec, num_classes, in_chans)
    control_model = None
    if pipeline.device_guide == "control_model":
        control_model = _network(run.control_model if run.control_model in reused else None, "control_model",
                                 control_spec, num_classes, in_chans)
        if control_model is None:
            return None
    if co_submodel is None:
        return None
    return check_device_budget(pipeline.device_budget, co_submodel, control_model, sample_shape, num_classes)
