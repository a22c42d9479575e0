"""The cloud of a real fleet: a Flower ``ServerApp`` that runs DC-CCL as ``dcccl pipeline`` does, except that each
device stage is carried out by the devices (Flower ``ClientApp``s, :mod:`dcccl.flower.client_app`).

The cloud submodel, the control model, the cloud's copy, fusion (any aggregation rule, latest-update included),
head fine-tuning and evaluation run here, through the same plan, coordinator and run directory as the pipeline: a
re-started ServerApp skips what is done, and a round cut short asks again only the devices whose copy is missing.
With ``secure_aggregation`` in the pipeline config each round's copies reach the cloud only as their weighted mean,
through Flower's SecAgg+ (:mod:`dcccl.flower.secure`).

Run configuration (``[tool.flwr.app.config]`` of ``configs/flower/pyproject.toml``, or ``flwr run --run-config``):
``pipeline-config`` (an absolute path to a pipeline config), ``run-dir`` (absolute; default: the config's own),
``reply-timeout`` (seconds a round waits for its devices), ``node-wait`` (seconds to wait for the nodes to join) and
``poll-interval`` (seconds between two checks for replies).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.artifacts.device_progress import is_finished
from dcccl.artifacts.exports import NetworkExport, load_export, save_export
from dcccl.errors import ConfigError
from dcccl.federated.device_report import DeviceReport, MalformedReport, WireBytes, record_report
from dcccl.federated.ledger import Ledger
from dcccl.federated.replies import reply_problems
from dcccl.federated.secure_aggregation import apply_mean_update
from dcccl.flower.polling import DEFAULT_POLL_INTERVAL, poll_interval_of, send_and_receive
from dcccl.flower.records import describe_network, payload_bytes, weights_record
from dcccl.flower.secure import secure_mean
from dcccl.pipeline.boundary import ResolvedStage
from dcccl.pipeline.coordinator import StageRunner
from dcccl.pipeline.steps import DeviceTask, StageCall

log = logging.getLogger("dcccl")
# Trainer options that only make sense on the cloud's machine.
CLOUD_ONLY_TRAINER_OPTIONS = ("default_root_dir", "logger")
# How the cloud records that a device's copy came (a device's reason to stop does not cross the wire).
NODE_STOPPED = "trained on its node"
SECURE_STOPPED = "trained on its node; its copy reached the cloud only in the SecAgg+ mean"


class DeviceFailed(RuntimeError):
    """A device answered with an error, or did not answer in time."""


@dataclass(frozen=True)
class WireRecord:
    """One message as it was sent or received: what it was for and how many bytes it carried.

    Args:
        round: The round.
        device: The device.
        kind: ``partition``, ``install`` or ``train``.
        direction: ``down`` (cloud to device) or ``up``.
        payload_bytes: Bytes of the tensors it carried (what the ledger counts).
        message_bytes: Bytes of all its records as Flower counts them (tensors with their headers and names,
            configs and metrics).
    """

    round: int
    device: int
    kind: str
    direction: str
    payload_bytes: int
    message_bytes: int


def message_bytes(content: RecordDict) -> int:
    """Bytes of a message's records and their names, as Flower counts them."""
    return sum(int(record.count_bytes()) + len(name) for name, record in content.items())


def recipe_of(call: StageCall) -> dict[str, Any]:
    """What a device needs, besides the networks, to train as the pipeline's device stage would."""
    stage, data = call.config_files[-1], (call.config_files[0] if len(call.config_files) > 1 else None)
    return {
        "stage_config": Path(stage).read_text(),
        "data_config": None if data is None else Path(data).read_text(),
        "trainer_args": {k: v for k, v in call.trainer_args.items() if k not in CLOUD_ONLY_TRAINER_OPTIONS},
        "data_args": call.data_args, "seed": call.seed, "extra_args": list(call.extra_args),
        "model_options": {k: v for k, v in call.model_args.items()
                          if k not in ("control_model", "co_submodel", "export_path")},
    }


class FlowerDevices:
    """A stage runner that sends device stages to the devices over a Flower ``Grid``; every other stage runs on the
    cloud through ``local``.

    Args:
        grid: The ServerApp's grid.
        local: Runs the cloud's own stages (the pipeline's stage runner).
        reply_timeout: Seconds a round waits for its devices' replies.
        node_wait: Seconds to wait for the devices a round needs to join.
        device_nodes: Which node id plays each device (``device-nodes`` in the run config). With SuperNode
            authentication a node id belongs to one registered key, so a node that claims another's partition-id is
            left out; without it, a node's partition-id is taken at its word.
        poll_interval: Seconds between two checks for replies.
    """

    # A node may train on a data config of its own: the cloud's partition says nothing of its share, so a reply's
    # count is checked against fleet.max_device_samples only.
    devices_train_on_the_partition = False

    def __init__(self, grid: Grid, local: StageRunner, reply_timeout: float = 600.0, node_wait: float = 120.0,
                 context: Optional[Context] = None, device_nodes: Optional[dict[int, int]] = None,
                 poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        self.grid = grid
        self.poll_interval = poll_interval
        self.exchanges: list[dict[str, Any]] = []  # when each exchange of the current call started and ended
        self.device_nodes = device_nodes
        self.context = context
        self.local = local
        self.reply_timeout = reply_timeout
        self.node_wait = node_wait
        self.node_of: dict[int, int] = {}  # device -> node id
        self.asked: set[int] = set()  # node ids asked for their partition
        self.installed: set[int] = set()  # devices installed in this run

    def resolve(self, call: StageCall) -> ResolvedStage:
        """As the local runner resolves it (the boundary is checked on the cloud, before anything is sent).

        Raises:
            ConfigError: For compressed transfers, which a simulated fleet runs but Flower's messages do not carry yet,
                and for an attack, which only a simulated fleet stages.
        """
        if call.stage == "device" and call.model_args.get("attack") is not None:
            raise ConfigError("attack makes devices of a simulated fleet (dcccl pipeline) lie; Flower's devices are "
                              "real: remove attack from the pipeline config to run on Flower")
        if call.stage == "device" and call.model_args.get("compression") is not None:
            raise ConfigError("compression runs on a simulated fleet (dcccl pipeline) only: Flower's messages carry "
                              "the full co-submodel; remove compression from the pipeline config to run on Flower")
        if call.secure_sum is not None and len(call.devices) < 2:
            raise ConfigError(f"secure aggregation needs at least two devices in a round, but {call.label!r} has "
                              f"{len(call.devices)}: give the fleet more devices (or a larger sample_fraction), or "
                              "remove secure_aggregation")
        return self.local.resolve(replace(call, secure_sum=None))  # the local runner refuses secure calls

    def __call__(self, call: StageCall, resume: bool) -> None:
        """Run ``call``: a device stage on the devices, anything else here."""
        if call.stage != "device":
            self.local(call, resume)
            return
        copy_of = {task.device: call.secure_sum.path if call.secure_sum is not None else task.export
                   for task in call.devices}
        pending = [task for task in call.devices if not is_finished(call.work_dir, task.device, copy_of[task.device])]
        if call.secure_sum is not None and pending:  # the secure sum is all of the round's devices or nothing
            pending = list(call.devices)
        if len(pending) < len(call.devices):
            log.info("[dcccl] %d of %d devices sent their copy before the round was interrupted; asking the other %d",
                     len(call.devices) - len(pending), len(call.devices), len(pending))
        self._find_nodes([task.device for task in pending])
        wire: list[WireRecord] = []
        self.exchanges = []
        try:
            self._install([task for task in pending if task.device not in self.installed], call, wire)
            if call.secure_sum is not None:
                self._train_secure(pending, call, wire)
            else:
                self._train(pending, call, wire)
        finally:  # what was sent is logged, also when a device failed
            log_path = call.work_dir / "messages.json"
            resumed = len(pending) < len(call.devices) and log_path.is_file()  # keep what the cut-short start sent
            earlier = json.loads(log_path.read_text()) if resumed else {}
            atomic_write_json(log_path, {"messages": earlier.get("messages", []) + [asdict(record) for record in wire],
                                         "exchanges": earlier.get("exchanges", []) + self.exchanges})

    def _exchange(self, messages: dict[int, Message], what: str) -> dict[int, Message]:
        """Send one message per node and return the replies by node; any error or silence raises."""
        replies, failures = self._exchange_some(messages, what)
        if failures:
            raise DeviceFailed("; ".join(failures))
        return replies

    def _exchange_some(self, messages: dict[int, Message], what: str) -> tuple[dict[int, Message], list[str]]:
        """Send one message per node; the good replies by node, and what went wrong with the others."""
        sent_at = time.time()
        replies = send_and_receive(self.grid, list(messages.values()), self.reply_timeout, self.poll_interval)
        self.exchanges.append({"what": what, "messages": len(messages), "sent": sent_at, "replied": time.time()})
        by_node: dict[int, Message] = {}
        failures: list[str] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failures.append(f"{what}: node {node} answered with an error: {reply.error.reason}")
            else:
                by_node[node] = reply
        missing = sorted(set(messages) - {reply.metadata.src_node_id for reply in replies})
        if missing:
            failures.append(f"{what}: no reply from node(s) {missing} within {self.reply_timeout:.0f} s "
                            "(reply-timeout in the run config)")
        return by_node, failures

    def _find_nodes(self, devices: Iterable[int]) -> None:
        needed = set(devices) - set(self.node_of)
        deadline = time.monotonic() + self.node_wait
        while needed:
            new = [node for node in self.grid.get_node_ids() if node not in self.asked]
            if new:
                self.asked.update(new)
                queries = {node: Message(RecordDict(), dst_node_id=node, message_type="query.partition")
                           for node in new}
                for node, reply in self._exchange(queries, "asking the nodes which device they are").items():
                    claimed = reply.content.metric_records.get("node", {}).get("partition-id")
                    problem = claim_problem(node, claimed, self.device_nodes)
                    if problem:
                        log.warning("[dcccl] node %d is not asked to train: %s", node, problem)
                        continue
                    if self.device_nodes is None and claimed in self.node_of:
                        raise DeviceFailed(f"two nodes ({self.node_of[claimed]} and {node}) say they are device "  # type: ignore[index]
                                           f"{claimed}: give each SuperNode its own partition-id, and bind them "
                                           "(device-nodes in the run config, with SuperNode authentication)")
                    if isinstance(claimed, int) and claimed >= 0:
                        self.node_of[claimed] = node
                needed -= set(self.node_of)
                continue
            if time.monotonic() > deadline:
                raise DeviceFailed(f"device(s) {sorted(needed)} did not join within {self.node_wait:.0f} s "
                                   f"({len(self.node_of)} nodes known: start their SuperNodes with those "
                                   "partition-ids, or under Flower's simulation runtime give it at least "
                                   f"{max(needed) + 1} virtual nodes: flwr run ... --federation-config "
                                   f"'num-supernodes={max(needed) + 1}')")
            time.sleep(1.0)

    def _install(self, tasks: list[DeviceTask], call: StageCall, wire: list[WireRecord]) -> None:
        if not tasks:
            return
        control = call.model_args.get("control_model")
        ledger = Ledger()  # refuses to send anything but the control model and the co-submodel
        ledger.check(tasks[0].device, "down", tasks[0].start)
        start = load_export(tasks[0].start, "co_submodel")
        records: dict[str, Any] = {"co_submodel": describe_network(start),
                                   "recipe": ConfigRecord({"json": json.dumps(recipe_of(call))})}
        if control is not None:
            ledger.check(tasks[0].device, "down", control)
            control_export = load_export(control, "control_model")
            records.update({"control_model": describe_network(control_export),
                            "control_model.weights": weights_record(control_export)})
        content = RecordDict(records)
        messages = {self.node_of[task.device]: Message(content, dst_node_id=self.node_of[task.device],
                                                       message_type="query.install") for task in tasks}
        self._exchange(messages, f"round {call.round_index}: installing the control model")
        for task in tasks:
            self.installed.add(task.device)
            wire.append(WireRecord(call.round_index, task.device, "install", "down", payload_bytes(content),
                                   message_bytes(content)))

    def _train(self, tasks: list[DeviceTask], call: StageCall, wire: list[WireRecord]) -> None:
        starts: dict[Path, NetworkExport] = {}
        messages: dict[int, Message] = {}
        for task in tasks:
            start = starts.setdefault(task.start, load_export(task.start, "co_submodel"))
            content = RecordDict({"co_submodel.weights": weights_record(start),
                                  "round": ConfigRecord({"round": call.round_index, "device": task.device})})
            node = self.node_of[task.device]
            messages[node] = Message(content, dst_node_id=node, message_type="train.copy",
                                     group_id=f"round{call.round_index}")
            wire.append(WireRecord(call.round_index, task.device, "train", "down", payload_bytes(content),
                                   message_bytes(content)))
        log.info("[dcccl] round %d: sent the co-submodel to %d device(s); waiting for their copies", call.round_index,
                 len(tasks))
        replies, failures = self._exchange_some(messages, f"round {call.round_index}: training")
        for task in tasks:  # the copies that came are kept (a re-started round asks only for the others)
            if self.node_of[task.device] not in replies:
                continue
            reply = replies[self.node_of[task.device]].content
            copy, report, problems = received_copy(reply, starts[task.start], task.device)
            if problems:  # kept as it came, for the record; the round's fusion refuses it for the same reasons
                log.warning("[dcccl] round %d: device %d's reply will not be fused: %s", call.round_index, task.device,
                            "; ".join(problems))
            save_export(copy, task.export)
            record_report(call.work_dir, task.export, replace(report, refused="; ".join(problems) or None))
            wire.append(WireRecord(call.round_index, task.device, "train", "up", payload_bytes(reply),
                                   message_bytes(reply)))
        if failures:
            raise DeviceFailed(f"{'; '.join(failures)} ({len(replies)} of {len(tasks)} copies were kept; re-starting "
                               "the ServerApp asks only the others)")


    def _train_secure(self, tasks: list[DeviceTask], call: StageCall, wire: list[WireRecord]) -> None:
        """Train the round's devices and average their copies with SecAgg+; writes only the weighted mean copy."""
        secure = call.secure_sum
        assert secure is not None
        if self.context is None:
            raise RuntimeError("secure aggregation needs the ServerApp's context (FlowerDevices(context=...))")
        ledger = Ledger()
        for task in tasks:
            ledger.check(task.device, "down", task.start)
        start = load_export(tasks[0].start, "co_submodel")
        nodes = {self.node_of[task.device]: task.device for task in tasks}
        log.info("[dcccl] round %d: training %d device(s) and averaging their copies with SecAgg+", call.round_index,
                 len(tasks))
        strategy, counting = secure_mean(self.grid, self.context, list(nodes),
                                         [value.numpy() for value in start.state_dict.values()], call.round_index,
                                         secure.settings, secure.weight_by_samples, self.poll_interval)
        up_bytes: dict[int, int] = {}
        down_bytes: dict[int, int] = {}
        for node, stage, direction, payload, total in counting.counted:
            device = nodes.get(node, -1)
            wire.append(WireRecord(call.round_index, device, f"secagg+ {stage}", direction, payload, total))
            if stage == "collect_masked_vectors":  # the co-submodel down with the fit settings, the masked update up
                (up_bytes if direction == "up" else down_bytes)[device] = payload
        reported = {nodes[int(proxy.node_id)]: fitres for proxy, fitres in strategy.results}
        if strategy.mean is None or set(reported) != set(nodes.values()):
            missing = sorted(set(nodes.values()) - set(reported))
            raise DeviceFailed(f"round {call.round_index}: SecAgg+ did not recover the mean of the copies (devices "
                               f"{missing or 'all'} did not finish the protocol; {len(strategy.failures)} failures): "
                               "re-starting the ServerApp runs the round again")
        try:
            reports = [DeviceReport.from_wire(device, fitres.metrics, SECURE_STOPPED)
                       for device, fitres in sorted(reported.items())]
        except MalformedReport as err:  # the mean holds its update already: the round cannot leave it out
            raise DeviceFailed(f"round {call.round_index}: {err}; re-starting the ServerApp runs the round again") \
                from None
        total = sum(int(report.sample_count or 0) for report in reports)
        mean = NetworkExport("co_submodel", start.backbone, start.num_classes, start.in_chans,
                             apply_mean_update(start.state_dict, strategy.mean), total)
        save_export(mean, secure.path)
        for report in reports:
            wire_bytes = WireBytes(down_bytes.get(report.device, 0), up_bytes.get(report.device, 0))
            record_report(call.work_dir, secure.path, replace(report, wire=wire_bytes))


def parse_device_nodes(text: str) -> dict[int, int]:
    """``device-nodes`` of the run config, ``"<device>=<node id>,..."``, as a map from device to node id.

    Raises:
        ConfigError: For anything but comma-separated pairs of whole numbers, a device twice or a node twice.
    """
    bound: dict[int, int] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        device, _, node = pair.partition("=")
        if not (device.strip().isdigit() and node.strip().isdigit()):
            raise ConfigError(f"device-nodes must read '<device>=<node id>,...' (whole numbers), got {pair!r}: "
                              "take the node ids that flwr supernode register printed")
        if int(device) in bound or int(node) in bound.values():
            raise ConfigError(f"device-nodes names device {device.strip()} or node {node.strip()} twice: bind each "
                              "device to one node")
        bound[int(device)] = int(node)
    return bound


def claim_problem(node: int, claimed: Any, bound: Optional[dict[int, int]]) -> str:
    """Why the cloud will not take ``node`` for the device it claims to be (empty: it takes it).

    Args:
        node: The node's id, which the SuperLink vouches for.
        claimed: The partition-id the node's reply gave (-1: a node of its own data, which plays no device).
        bound: ``device-nodes``, when the run config binds devices to nodes.
    """
    if not isinstance(claimed, int) or isinstance(claimed, bool) or claimed < -1:
        return f"its partition-id is not a device index ({claimed!r})"
    if bound is None or claimed == -1:
        return ""
    if bound.get(claimed) != node:
        owner = bound.get(claimed)
        return (f"it claims device {claimed}, which is bound to node {owner}" if owner is not None
                else f"it claims device {claimed}, which device-nodes binds to no node")
    return ""


def received_copy(reply: RecordDict, start: NetworkExport, device: int) -> tuple[NetworkExport, DeviceReport,
                                                                                 list[str]]:
    """``device``'s reply to being sent ``start``: an export holding the weights it carried with the counts its report
    gives (nothing is assumed of them), its report (:class:`~dcccl.federated.device_report.DeviceReport`), and every
    reason to refuse it (:func:`~dcccl.federated.replies.reply_problems`; the device's share is checked at fusion,
    where the cloud knows it). A report that cannot be read is refused, and its copy is kept without counts, so the
    fusion refuses it too."""
    problems: list[str] = []
    weights: dict[str, Any] = {}
    if "co_submodel.weights" in reply.array_records:
        try:
            weights = dict(reply.array_records["co_submodel.weights"].to_torch_state_dict())
        except Exception as err:  # Flower raises several types for arrays it cannot turn into tensors
            problems.append(f"its weights cannot be read as tensors ({type(err).__name__}: {err})")
    else:
        problems.append("it carries no co_submodel.weights")
    try:
        report = DeviceReport.from_wire(device, reply.metric_records.get("counts", {}), NODE_STOPPED)
    except MalformedReport as err:
        problems.append(str(err))
        report = DeviceReport.unreadable(device, NODE_STOPPED, str(err))
    class_counts = None if report.class_counts is None else list(report.class_counts)
    copy = NetworkExport("co_submodel", start.backbone, start.num_classes, start.in_chans, weights,
                         report.sample_count, class_counts)  # checked below
    return copy, report, problems or reply_problems(copy, start)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the pipeline of ``pipeline-config`` with its device stages on the fleet's nodes."""
    from dcccl.commands.console import configure_logging  # the pipeline's own wiring (imports Lightning)
    from dcccl.commands.pipeline import pipeline_main

    config = context.run_config
    if "pipeline-config" not in config:
        raise ValueError("the run config needs pipeline-config: flwr run configs/flower <connection> --run-config "
                         "'pipeline-config=\"/abs/path/fleet.yaml\"'")
    argv = ["--config", str(config["pipeline-config"])]
    if config.get("run-dir"):
        argv += ["--run_dir", str(config["run-dir"])]
    configure_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to the SuperLink otherwise
    bound = parse_device_nodes(str(config["device-nodes"])) if config.get("device-nodes") else None
    poll_interval = poll_interval_of(config.get("poll-interval"))
    pipeline_main(argv, device_runner=lambda local: FlowerDevices(
        grid, local, float(config.get("reply-timeout", 600.0)), float(config.get("node-wait", 120.0)),  # type: ignore[arg-type]
        context, bound, poll_interval))
