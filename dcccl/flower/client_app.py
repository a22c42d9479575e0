"""A device of a real fleet: a Flower ``ClientApp`` that trains the co-submodel with the pipeline's device stage.

Each node is configured on its own machine (``flower-supernode --node-config``):

- ``state-dir`` (required): an absolute folder where the node keeps what the cloud installed and its copies;
- ``partition-id``: the device's index in the fleet; with the cloud's data config, the node trains on that device's
  share of it (a simulated fleet, or a test on one machine);
- ``data-config``: a dcccl data config file on the node (its own image folder as the device side); the node then
  trains on all of its device-side samples.

A virtual node of Flower's simulation runtime has only ``partition-id`` and ``num-partitions``: it plays the device
``partition-id`` and keeps its state in :func:`simulated_state_dir`.

Messages it answers: ``query.partition`` (which device it is), ``query.install`` (the control model, the
co-submodel's architecture and the training settings, once per run), ``train`` (SecAgg+'s messages under secure
aggregation: the round's co-submodel down, the masked update up) and ``train.copy`` (the round's co-submodel down; the
copy, its sample count, when the rule asks its samples per class, and with DP-SGD the epsilon it has spent up).
What the device keeps between rounds (its privacy accountant's history) stays in its own folder. It refuses, with an
error reply, any message that carries a network of another role (the cloud submodel) or a record it does not expect.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from dcccl.errors import ConfigError
from dcccl.flower.records import RefusedMessage, check_received

if TYPE_CHECKING:
    from dcccl.artifacts.exports import NetworkExport
    from dcccl.federated.device_report import DeviceReport
    from dcccl.pipeline.steps import StageCall

# Flower starts a fresh flwr-clientapp process for every message: each handler imports only what its message needs
# (a query for the node's partition imports neither torch nor timm nor Lightning; a round imports all three).
LOADED_AT = time.time()  # when this process loaded the app (after Python and Flower started)
app = ClientApp()

# Record name -> the roles a network under it may have: what each message may carry, nothing else.
INSTALL_RECORDS: dict[str, set[str]] = {"control_model": {"control_model"}, "control_model.weights": set(),
                                        "co_submodel": {"co_submodel"}, "recipe": set()}
TRAIN_RECORDS: dict[str, set[str]] = {"co_submodel.weights": set(), "round": set()}


def node_dir(context: Context) -> Path:
    """This node's folder for the current run: under its ``state-dir``, or for a virtual node of Flower's simulation
    runtime (no ``state-dir``; ``num-partitions`` in its node config) under :func:`simulated_state_dir`."""
    state_dir = context.node_config.get("state-dir")
    if state_dir is None and "num-partitions" in context.node_config:
        state_dir = str(simulated_state_dir(context))
    if state_dir is None:
        raise ConfigError("the node needs a state-dir: flower-supernode --node-config 'state-dir=\"/abs/folder\" ...'")
    return Path(str(state_dir)) / f"run_{context.run_id}"


def simulated_state_dir(context: Context) -> Path:
    """Where a virtual node of Flower's simulation runtime keeps its state: ``partition_<id>`` under the run config's
    ``node-state-dir`` (absolute; on a Ray cluster of several machines, a folder they all share, since any of them may
    run a virtual node's next message), or else under ``dcccl-simulation`` in the temporary folder of the machine that
    runs it."""
    root = str(context.run_config.get("node-state-dir") or "")
    if root and not Path(root).is_absolute():
        raise ConfigError(f"node-state-dir must be an absolute path, got {root!r}")
    base = Path(root) if root else Path(tempfile.gettempdir()) / "dcccl-simulation"
    return base / f"partition_{partition_of(context)}"


def partition_of(context: Context) -> Optional[int]:
    """The device index this node plays in the fleet (``None``: it trains on its own data config's samples)."""
    value = context.node_config.get("partition-id")
    return None if value is None else int(value)  # type: ignore[arg-type]


@app.query("partition")
def partition(message: Message, context: Context) -> Message:
    """Say which device of the fleet this node is (-1: its own data, no partition)."""
    check_received(message.content, {})
    device = partition_of(context)
    return Message(RecordDict({"node": MetricRecord({"partition-id": -1 if device is None else device})}),
                   reply_to=message)


@app.query("install")
def install(message: Message, context: Context) -> Message:
    """Keep the control model, the co-submodel's architecture and the training settings on the node's disk."""
    from dcccl.artifacts.exports import save_export
    from dcccl.flower.records import network_from

    check_received(message.content, INSTALL_RECORDS)
    folder = node_dir(context)
    folder.mkdir(parents=True, exist_ok=True)
    content = message.content
    if "control_model" in content.config_records:
        control = network_from(content.config_records["control_model"], content.array_records["control_model.weights"])
        save_export(control, folder / "control_model.pt")
    (folder / "co_submodel.json").write_text(json.dumps(dict(content.config_records["co_submodel"])))
    (folder / "recipe.json").write_text(str(content.config_records["recipe"]["json"]))
    return Message(RecordDict({"node": MetricRecord({"installed": 1})}), reply_to=message)


def device_call(folder: Path, recipe: dict[str, Any], context: Context, round_index: int) -> StageCall:
    """The device stage this node runs for a round: the cloud's recipe, this node's files and data."""
    from dcccl.pipeline.steps import DeviceTask, StageCall

    work = folder / f"round_{round_index:03d}"
    work.mkdir(parents=True, exist_ok=True)
    stage_config = work / "device.yaml"
    stage_config.write_text(recipe["stage_config"])
    own_data = context.node_config.get("data-config")
    device = partition_of(context)
    if own_data is not None:
        data_config: Optional[Path] = Path(str(own_data))
        data_args: dict[str, Any] = {}
        device = 0
    else:
        data_config = None
        if recipe["data_config"] is not None:
            data_config = work / "data.yaml"
            data_config.write_text(recipe["data_config"])
        data_args = recipe["data_args"]
        if device is None:
            raise ConfigError("the node has neither a partition-id nor a data-config: give it one "
                              "(flower-supernode --node-config 'partition-id=0 ...' or 'data-config=\"...\"')")
    control = folder / "control_model.pt"
    start, copy = work / "start.pt", work / "co_submodel.pt"
    # What the device keeps between its rounds (its privacy accountant's history): the latest earlier round's.
    keeps_state = recipe["model_options"].get("privacy") is not None
    earlier = [path for path in sorted(folder.glob("round_*/device_state.pt")) if path.parent.name < work.name]
    state_in = earlier[-1] if earlier and keeps_state else None
    state_out = work / "device_state.pt" if keeps_state else None
    model_args: dict[str, Any] = {"control_model": str(control) if control.is_file() else None,
                                  "co_submodel": str(start), "export_path": None, **recipe["model_options"]}
    return StageCall(
        label=f"round {round_index}: this device", restart_point="rounds", outputs=(copy,),
        inputs=tuple(p for p in (control, start) if p.is_file()), round_index=round_index, stage="device",
        command="fit", config_files=tuple(p for p in (data_config, stage_config) if p is not None),
        model_args=model_args, trainer_args={**recipe["trainer_args"], "default_root_dir": str(work)},
        data_args=data_args, seed=int(recipe["seed"]), work_dir=work, partition="device",
        extra_args=tuple(recipe["extra_args"]),
        devices=(DeviceTask(device, start, copy, state_in=state_in, state_out=state_out),))


def train_here(context: Context, round_index: int, start: NetworkExport,
               entered: float) -> tuple[StageCall, NetworkExport, DeviceReport]:
    """Train this device's copy for ``round_index`` from ``start`` (its message's handler started at ``entered``):
    the call it ran, its copy, what it reports."""
    from dcccl.artifacts.exports import load_export, save_export
    from dcccl.commands.stage_runner import LightningStageRunner  # the pipeline's own stage runner (imports Lightning)

    folder = node_dir(context)
    if not (folder / "recipe.json").is_file():
        raise RuntimeError("this node was not installed for the run (no query.install message came first)")
    recipe = json.loads((folder / "recipe.json").read_text())
    call = device_call(folder, recipe, context, round_index)
    save_export(start, call.devices[0].start)
    fit_started = time.time()
    LightningStageRunner(interactive=False)(call, resume=False)
    fit_ended = time.time()
    copy = load_export(call.devices[0].export, "co_submodel")
    write_timing(call.work_dir, {"app_loaded": LOADED_AT, "handler_started": entered, "fit_started": fit_started,
                                 "fit_ended": fit_ended})
    return call, copy, report_of(call.work_dir, call.devices[0].device, copy)


def write_timing(work_dir: Path, moments: dict[str, float]) -> None:
    """Keep in ``work_dir/timing.json`` when this round's process loaded the app, entered the handler (its imports
    follow) and started and ended the device stage (Unix seconds; benchmarks/flower_round.py reads them)."""
    (work_dir / "timing.json").write_text(json.dumps(moments))


def report_of(work_dir: Path, device: int, copy: NetworkExport) -> DeviceReport:
    """What this node reports up of the device round it ran in ``work_dir``: what the round recorded of ``device``
    (epochs, steps, samples, with DP-SGD the epsilon spent over the run so far) with the counts its ``copy`` goes up
    with."""
    from dcccl.federated.device_report import finished_reports

    trained = finished_reports(work_dir, [device])[0]
    return trained.with_counts(int(copy.sample_count or 0), copy.class_counts)


def architecture(context: Context) -> ConfigRecord:
    """The co-submodel's description the cloud installed on this node."""
    return ConfigRecord(json.loads((node_dir(context) / "co_submodel.json").read_text()))


@app.train("copy")
def train(message: Message, context: Context) -> Message:
    """Train this device's copy from the round's co-submodel; send the copy and its counts back."""
    entered = time.time()
    from dcccl.flower.records import network_from, weights_record

    check_received(message.content, TRAIN_RECORDS)
    round_index = int(message.content.config_records["round"]["round"])  # type: ignore[arg-type]
    start = network_from(architecture(context), message.content.array_records["co_submodel.weights"])
    _, copy, report = train_here(context, round_index, start, entered)
    return Message(RecordDict({"co_submodel.weights": weights_record(copy), "counts": MetricRecord(report.to_wire())}),
                   reply_to=message)


@app.train(mods=[secaggplus_mod])
def secure_train(message: Message, context: Context) -> Message:
    """A round under secure aggregation: train from the co-submodel SecAgg+ brings, reply with the update (the copy
    minus its start) for ``secaggplus_mod`` to mask, weighted by the sample count (or by one)."""
    entered = time.time()
    import torch
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from dcccl.federated.secure_aggregation import update_arrays
    from dcccl.flower.records import network_from

    fit_ins = compat.recorddict_to_fitins(message.content, keep_input=True)
    round_index = int(fit_ins.config["round"])  # type: ignore[arg-type]
    description = architecture(context)
    if str(description.get("role")) != "co_submodel":
        raise RefusedMessage("refusing to train anything but the co-submodel under secure aggregation")
    arrays = parameters_to_ndarrays(fit_ins.parameters)
    empty = network_from(description, ArrayRecord())
    keys = list(empty.backbone.without_weights().build(empty.num_classes, empty.in_chans).state_dict())
    if len(arrays) != len(keys):
        raise RefusedMessage(f"the secure round's co-submodel has {len(arrays)} tensors, the installed one "
                             f"{len(keys)}")
    start_state = {key: torch.as_tensor(array) for key, array in zip(keys, arrays)}
    start = replace(empty, state_dict=start_state)
    _, copy, report = train_here(context, round_index, start, entered)
    weight = report.sample_count if fit_ins.config.get("weight-by-samples", True) else 1
    # The cloud sees only the round's mean: no device's samples per class go up with it.
    counts = replace(report, class_counts=None).to_wire()
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update_arrays(copy.state_dict, start_state)),
                     int(weight or 0), counts)
    return Message(compat.fitres_to_recorddict(fit_res, keep_input=True), reply_to=message)
