"""DC-CCL on Flower: a real SuperLink and three real SuperNodes on loopback against ``dcccl pipeline`` with the same
fleet config and seed; the ledger against the bytes of the messages actually sent; a device refuses the cloud
submodel. Needs the flower extra (``pip install -e ".[flower]"``); skipped without it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import require_extra

flwr = require_extra("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402

from dcccl.artifacts.exports import load_export, save_export  # noqa: E402
from dcccl.errors import ConfigError  # noqa: E402
from dcccl.federated.device_report import DeviceReport  # noqa: E402
from dcccl.federated.replies import reply_problems  # noqa: E402
from dcccl.flower.client_app import app as device_app  # noqa: E402
from dcccl.flower.records import RefusedMessage, describe_network, weights_record  # noqa: E402
from tests.commands import command_env, dcccl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEADLINE_S = 600
# Same seed, same data, same device stage: the copies differ at most by float rounding between processes (the
# nodes run one thread each), so the served accuracy may move by a test sample or two.
SERVED_TOLERANCE = 0.01


def _context(tmp_path: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"state-dir": str(tmp_path / "node"), "partition-id": 0},
                   state=RecordDict(), run_config={})


def test_a_device_refuses_a_message_that_carries_the_cloud_submodel(
        tmp_path: Path, export_factory: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # What Flower's runtime sets in the process of a task: a message is built for this run, from this node.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cloud = load_export(export_factory("cloud_submodel"))  # type: ignore[operator]
    disguised = RecordDict({"control_model": describe_network(cloud), "control_model.weights": weights_record(cloud),
                            "co_submodel": describe_network(cloud), "recipe": ConfigRecord({"json": "{}"})})
    message = Message(disguised, dst_node_id=1, message_type="query.install")
    with pytest.raises(RefusedMessage, match="carries a cloud_submodel as 'control_model'"):
        device_app(message, _context(tmp_path))
    extra = Message(RecordDict({"cloud_submodel.weights": weights_record(cloud)}), dst_node_id=1,
                    message_type="train.copy")
    with pytest.raises(RefusedMessage, match="unexpected record 'cloud_submodel.weights'"):
        device_app(extra, _context(tmp_path))
    assert not (tmp_path / "node").exists()  # nothing was kept


def test_a_virtual_node_of_the_simulation_runtime_keeps_its_state_per_partition(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dcccl.flower.client_app import node_dir

    def context(node_config: dict, run_config: dict) -> Context:
        return Context(run_id=7, node_id=99, node_config=node_config, state=RecordDict(), run_config=run_config)

    virtual = {"partition-id": 2, "num-partitions": 3}  # what Flower's simulation runtime gives a virtual node
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))  # what $TMPDIR sets
    assert node_dir(context(virtual, {"node-state-dir": ""})) == tmp_path / "tmp/dcccl-simulation/partition_2/run_7"
    shared = tmp_path / "shared"
    assert node_dir(context(virtual, {"node-state-dir": str(shared)})) == shared / "partition_2/run_7"
    with pytest.raises(ConfigError, match="node-state-dir must be an absolute path, got 'nodes'"):
        node_dir(context(virtual, {"node-state-dir": "nodes"}))
    # A real node's own state-dir wins; without one (and not virtual) it is refused.
    assert node_dir(context({**virtual, "state-dir": str(shared)}, {})) == shared / "run_7"
    with pytest.raises(ConfigError, match="the node needs a state-dir"):
        node_dir(context({"partition-id": 2}, {}))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_the_cloud_checks_each_reply_before_it_is_fused(export_factory) -> None:  # type: ignore[no-untyped-def]
    from flwr.app import ArrayRecord, MetricRecord

    from dcccl.artifacts.exports import NetworkExport
    from dcccl.flower.server_app import received_copy

    start = load_export(export_factory("co_submodel", sample_count=None))
    trained = load_export(export_factory("co_submodel", name="trained", seed=1))

    def reply(weights: dict | None = None, **counts: object) -> RecordDict:
        honest = {"sample-count": 12, "epochs": 1, "steps": 1, "samples": 12}
        records: dict = {"counts": MetricRecord({**honest, **counts})}  # type: ignore[dict-item]
        if weights is not None:
            records["co_submodel.weights"] = ArrayRecord(weights)  # type: ignore[arg-type]
        return RecordDict(records)

    good = {key: value.clone() for key, value in trained.state_dict.items()}
    copy, report, problems = received_copy(reply(good, **{"class-counts": [0] * 7 + [4, 4, 4]}), start, 5)
    assert problems == [] and copy.sample_count == 12 and copy.class_counts == [0] * 7 + [4, 4, 4]
    assert report == DeviceReport(5, 1, 1, 12, "trained on its node", 12, (0,) * 7 + (4, 4, 4))
    key = next(k for k, v in good.items() if v.dim() > 1)
    nan = {**good, key: torch.full_like(good[key], float("nan"))}
    assert received_copy(reply(nan), start, 5)[2] == [f"{key} holds {good[key].numel()} NaN or infinite values"]
    assert received_copy(reply({**good, key: torch.zeros(2, 2)}), start, 5)[2][0].startswith(
        f"{key} has shape (2, 2)")
    assert received_copy(reply(good, **{"sample-count": -3}), start, 5)[2] == [
        "it reports -3 samples, and a trained copy needs at least one"]
    assert received_copy(reply(good, **{"class-counts": [1] * 10}), start, 5)[2] == [
        "its samples per class add up to 10, not to the 12 it reports"]
    assert received_copy(reply(None), start, 5)[2] == ["it carries no co_submodel.weights"]
    # What came is what is kept: the fusion refuses it again from the file, for the same reasons.
    assert isinstance(copy, NetworkExport) and copy.role == "co_submodel"
    # A report of the wrong types (a MetricRecord holds numbers and lists of them) is refused by name; its copy is
    # kept without counts, which the fusion refuses.
    for lie, problem in [({"sample-count": 2.5}, "its sample-count is 2.5, not a whole number"),
                         ({"steps": [3, 4]}, "its steps is [3, 4], not a whole number"),
                         ({"class-counts": [1.5] * 10}, "its class-counts hold 1.5, not a whole number"),
                         ({"epsilon": [1.0]}, "its epsilon is [1.0], not a number")]:
        copy, report, problems = received_copy(reply(good, **lie), start, 5)  # type: ignore[arg-type]
        assert problems == [f"device 5's report is malformed: {problem}"]
        assert (copy.sample_count, copy.class_counts, report.refused) == (None, None, problems[0])
        assert reply_problems(copy, start) == ["its sample count is None, not a whole number"]


def test_a_simulated_round_and_a_flower_device_report_the_same(tmp_path: Path, export_factory: object) -> None:
    """The report a Flower node sends up is the one its device round recorded, with its copy's counts, and the cloud
    reads back what a simulated round of the same device records."""
    from flwr.app import MetricRecord

    from dcccl.federated.device_report import finished_reports, record_report
    from dcccl.flower.client_app import report_of
    from dcccl.flower.server_app import NODE_STOPPED, received_copy
    from dcccl.pipeline.steps import DeviceTask
    from lightning_modules import DeviceRoundModule
    from tests.test_device_round import device_module, fleet_data, trainer

    control = export_factory("control_model", seed=2)  # type: ignore[operator]
    start = export_factory("co_submodel", seed=3)  # type: ignore[operator]
    task = DeviceTask(2, start, tmp_path / "round/device_2.pt")
    trainer(tmp_path / "round").fit(DeviceRoundModule(device_module(control, start, report_class_counts=True),
                                                      [task]), datamodule=fleet_data())
    simulated = finished_reports(tmp_path / "round", [2])[0]
    copy = load_export(task.export, "co_submodel")
    sent = report_of(tmp_path / "round", 2, copy)  # what the node's train.copy reply carries
    reply = RecordDict({"co_submodel.weights": weights_record(copy), "counts": MetricRecord(sent.to_wire())})
    kept, received, problems = received_copy(reply, load_export(start), 2)
    assert problems == []
    fields = ("device", "epochs", "steps", "samples", "sample_count", "class_counts", "privacy")
    assert [getattr(received, name) for name in fields] == [getattr(sent, name) for name in fields] == [
        getattr(simulated.with_counts(copy.sample_count, copy.class_counts), name) for name in fields]
    assert (received.sample_count, list(received.class_counts or ())) == (copy.sample_count, copy.class_counts)
    assert simulated.steps >= 12 and simulated.sample_count is None  # a simulated record: the counts are the copy's
    assert (kept.sample_count, kept.class_counts) == (copy.sample_count, copy.class_counts)
    # The cloud's record keeps the keys it always had (and the samples per class it was sent).
    save_export(kept, tmp_path / "cloud/device_2.pt")
    recorded = record_report(tmp_path / "cloud", tmp_path / "cloud/device_2.pt", received).to_record()
    assert set(recorded) == {"device", "copy", "copy_sha256", "epochs", "steps", "samples", "sample_count",
                             "class_counts", "stopped"} and recorded["stopped"] == NODE_STOPPED


def test_a_node_claiming_another_node_s_device_is_left_out_when_devices_are_bound() -> None:
    from dcccl.flower.server_app import claim_problem, parse_device_nodes

    bound = parse_device_nodes("0=111, 1=222,2=333")
    assert bound == {0: 111, 1: 222, 2: 333}
    assert claim_problem(222, 1, bound) == ""
    assert claim_problem(999, 1, bound) == "it claims device 1, which is bound to node 222"
    assert claim_problem(999, 7, bound) == "it claims device 7, which device-nodes binds to no node"
    assert claim_problem(999, -1, bound) == ""  # a node of its own data plays no device of the fleet
    assert claim_problem(222, "1", bound) == "its partition-id is not a device index ('1')"
    assert claim_problem(222, True, None) == "its partition-id is not a device index (True)"
    assert claim_problem(222, 1, None) == ""  # unbound: the caller refuses a second claimant
    for text, says in (("0=1,x=2", "whole numbers"), ("0=1,0=2", "twice"), ("0=1,1=1", "twice")):
        with pytest.raises(ConfigError, match=says):
            parse_device_nodes(text)


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited before listening on {port}:\n{log.read_text()[-3000:]}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")


def _flwr(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    result = subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"flwr {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def fleet_config(tmp_path: Path, rounds: int = 2, **settings: object) -> Path:
    """Three devices, two rounds, every device in every round, few batches per stage (plus ``settings``)."""
    quickstart = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    config = {
        "config": str(ROOT / "configs/fleet.yaml"), "name": "flower", "rounds": rounds,
        "fleet": {"num_devices": 3, "partitioner": "dirichlet", "dirichlet_alpha": 0.5, "sample_fraction": 1.0,
                  "availability": 1.0},
        "trainer": {**quickstart["trainer"], "limit_train_batches": 8, "limit_val_batches": 2,
                    "enable_progress_bar": False},
    }
    path = tmp_path / "flower_fleet.yaml"
    path.write_text(yaml.safe_dump({**config, **settings}, sort_keys=False))  # "config:" first: later keys win
    return path


def flower_env(home: Path, link_port: int, **extra: str) -> dict[str, str]:
    """The environment of Flower's commands, with a Flower configuration in ``home`` whose default connection,
    ``loopback``, is the SuperLink on ``link_port``."""
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    return command_env(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", OMP_NUM_THREADS="1",
                       PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)


def start_superlink(env: dict[str, str], port: int, log: Path, *options: str) -> subprocess.Popen:
    """A SuperLink on 127.0.0.1:``port`` in a session of its own, listening when this returns."""
    process = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:", *options],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_port(port, process, log)
    return process


def start_supernode(env: dict[str, str], link_port: int, port: int, device: int, state: Path,
                    logs: Path) -> subprocess.Popen:
    """A SuperNode playing ``device`` (its partition-id), keeping its state in ``state``, in a session of its own,
    listening on 127.0.0.1:``port`` when this returns; its log is ``logs/supernode<device>.log``."""
    log = logs / f"supernode{device}.log"
    process = subprocess.Popen(
        [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
         "--host", "127.0.0.1", "--port", str(port), "--max-retries", "10", "--max-wait-time", "60",
         "--node-config", f'partition-id={device} state-dir="{state}"'],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_port(port, process, log)
    return process


def run_to_the_end(env: dict[str, str], config: Path, run_dir: Path, processes: list[subprocess.Popen],
                   *options: str, run_config: str = "") -> None:
    """``flwr run configs/flower loopback`` with ``config`` and ``run_dir`` (and ``options``), until it finishes;
    fails the test unless it completed."""
    started = json.loads(_flwr(env, "run", "configs/flower", "loopback", "--format", "json", "--run-config",
                               f'pipeline-config="{config}" run-dir="{run_dir}" reply-timeout=300.0 {run_config}',
                               *options, timeout=120))
    run_id = str(started["run-id"])
    deadline, status = time.monotonic() + DEADLINE_S, ""
    while time.monotonic() < deadline:
        listed = json.loads(_flwr(env, "list", "loopback", "--run-id", run_id, "--format", "json", timeout=30))
        status = listed["runs"][0]["status"]
        if status.startswith("finished"):
            break
        assert all(process.poll() is None for process in processes), "a Flower process died"
        time.sleep(2)
    if status != "finished:completed":
        shown = subprocess.run([str(BIN / "flwr"), "log", run_id, "loopback", "--show"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60).stdout
        pytest.fail(f"the Flower run ended as {status!r}:\n{shown[-6000:]}")


def stop(processes: list[subprocess.Popen]) -> None:
    """Kill each process's group (each was started in a session of its own)."""
    for process in processes:
        try:
            os.killpg(process.pid, 9)
        except ProcessLookupError:
            pass
        process.wait()


def run_on_flower(tmp_path: Path, config: Path, run_dir: Path, nodes: int = 3) -> None:
    """Run ``config`` through the Flower App on a real SuperLink and ``nodes`` SuperNodes on loopback."""
    link_port, *node_ports = _free_ports(nodes + 1)
    home = tmp_path / "flwr_home"
    env = flower_env(home, link_port)
    processes: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        processes.append(start_superlink(env, link_port, logs / "superlink.log"))
        for device, port in enumerate(node_ports):
            processes.append(start_supernode(env, link_port, port, device, tmp_path / f"node{device}", logs))
        run_to_the_end(env, config, run_dir, processes)
    finally:
        stop(processes)

    shutil.rmtree(home, ignore_errors=True)


def pipeline_reference(tmp_path: Path, config: Path) -> Path:
    """``dcccl pipeline`` on ``config`` in ``tmp_path/reference``, one thread, as each Flower process gets: the same
    float arithmetic on both sides."""
    reference = dcccl("pipeline", "--config", str(config), "--run_dir", str(tmp_path / "reference"),
                      env=command_env(OMP_NUM_THREADS="1"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    return tmp_path / "reference"


def assert_serves_what_the_pipeline_serves(reference: Path, run_dir: Path, kept: list[Path], rounds: int = 2,
                                           devices: int = 3) -> None:
    """The Flower run in ``run_dir`` served what the pipeline's run in ``reference`` served, its ledger counts the
    same transfers and exactly the tensors of its messages, and nothing its nodes ``kept`` is of the cloud submodel."""
    expected = json.loads((reference / "metrics.json").read_text())
    served = json.loads((run_dir / "metrics.json").read_text())
    print("served per round: pipeline", expected["served/acc_per_round"], "flower", served["served/acc_per_round"])
    assert served["served/acc_per_round"] == pytest.approx(expected["served/acc_per_round"], abs=SERVED_TOLERANCE)
    # The ledger says what crossed: the same transfers as the pipeline's, and exactly the tensors of the messages.
    ledger = json.loads((run_dir / "transfers.json").read_text())
    assert ledger["totals"] == json.loads((reference / "transfers.json").read_text())["totals"]
    counted: dict[tuple[int, int, str], int] = defaultdict(int)
    for transfer in ledger["transfers"]:
        if transfer["what"] in ("control_model", "co_submodel"):
            counted[(transfer["round"], transfer["device"], transfer["direction"])] += transfer["bytes"]
    sent: dict[tuple[int, int, str], int] = defaultdict(int)
    for r in range(1, rounds + 1):
        for message in json.loads((run_dir / f"rounds/round_{r:03d}/devices/messages.json").read_text())["messages"]:
            sent[(message["round"], message["device"], message["direction"])] += message["payload_bytes"]
            assert message["message_bytes"] >= message["payload_bytes"]
    assert dict(counted) == dict(sent) and len(sent) == rounds * devices * 2
    # Nothing the nodes kept is the cloud submodel, nor holds any of its weights.
    cloud = [t for t in load_export(run_dir / "cloud/cloud_submodel.pt").state_dict.values() if t.numel() > 16]
    assert kept
    for path in kept:
        export = load_export(path)
        assert export.role in ("control_model", "co_submodel")
        assert not any(c.shape == t.shape and c.equal(t) for t in export.state_dict.values() for c in cloud)


@pytest.mark.slow
def test_a_loopback_fleet_on_flower_serves_what_the_pipeline_serves(tmp_path: Path) -> None:
    config = fleet_config(tmp_path)
    reference = pipeline_reference(tmp_path, config)
    run_dir = tmp_path / "flower"
    run_on_flower(tmp_path, config, run_dir)
    assert_serves_what_the_pipeline_serves(reference, run_dir, list(tmp_path.glob("node*/**/*.pt")))


@pytest.mark.slow
def test_secure_aggregation_on_loopback_equals_plain_fedavg_within_its_quantisation(tmp_path: Path) -> None:
    from dcccl.federated.secure_aggregation import SecureAggregation, quantization_tolerance

    config = fleet_config(tmp_path, rounds=1, secure_aggregation={}, aggregation={
        "class_path": "FedAvg", "init_args": {"cloud_share": 0.5, "device_weighting": "samples"}})
    run_dir = tmp_path / "secure"
    run_on_flower(tmp_path, config, run_dir)

    # The cloud holds the mean of the copies, never a copy; the nodes hold their own.
    assert (run_dir / "rounds/round_001/devices/secure_sum.pt").is_file()
    assert not list(run_dir.glob("rounds/round_001/device_*"))
    copies = [load_export(next((tmp_path / f"node{device}").glob("run_*/round_001/co_submodel.pt")))
              for device in range(3)]
    cloud = load_export(run_dir / "rounds/round_001/cloud_round/co_submodel.pt")
    fused = load_export(run_dir / "rounds/round_001/fusion/co_submodel.pt").state_dict
    counts = [copy.sample_count for copy in copies]
    tolerance = 0.5 * quantization_tolerance(SecureAggregation(), counts)  # the devices' half of the fusion
    assert tolerance < 1e-3
    worst = 0.0
    for key, value in fused.items():
        if not value.is_floating_point():
            continue
        plain = 0.5 * cloud.state_dict[key].double() + 0.5 * sum(
            n * copy.state_dict[key].double() for n, copy in zip(counts, copies)) / sum(counts)
        worst = max(worst, float((value.double() - plain).abs().max()))
    print("largest difference from plain FedAvg", worst, "tolerance", tolerance)
    assert worst <= tolerance + 1e-6
    # Each device's masked update is counted up, the co-submodel down; every SecAgg+ message is logged.
    transfers = json.loads((run_dir / "transfers.json").read_text())["transfers"]
    up = {t["device"]: t["bytes"] for t in transfers if t["what"] == "co_submodel" and t["direction"] == "up"}
    messages = json.loads((run_dir / "rounds/round_001/devices/messages.json").read_text())["messages"]
    masked = {m["device"]: m["payload_bytes"] for m in messages
              if m["kind"] == "secagg+ collect_masked_vectors" and m["direction"] == "up"}
    assert up == masked and sorted(up) == [0, 1, 2]
    assert all(size >= sum(v.numel() for v in fused.values() if v.is_floating_point()) for size in up.values())
    assert {m["kind"] for m in messages} >= {"secagg+ setup", "secagg+ share_keys", "secagg+ collect_masked_vectors",
                                            "secagg+ unmask"}


def test_the_cloud_checks_for_replies_at_the_run_config_s_pace() -> None:
    from types import SimpleNamespace

    from dcccl.flower.polling import DEFAULT_POLL_INTERVAL, poll_interval_of, send_and_receive

    assert poll_interval_of(None) == DEFAULT_POLL_INTERVAL and poll_interval_of(3) == 3.0
    for bad in ("fast", 0.0, 100, True):
        with pytest.raises(ConfigError, match="poll-interval must be a number of seconds"):
            poll_interval_of(bad)

    class Grid:  # replies come one per pull, the last never
        pulls = 0

        def push_messages(self, messages: object) -> list[str]:
            return ["a", "b", "c"]

        def pull_messages(self, ids: set[str]) -> list[object]:
            self.pulls += 1
            came = sorted(ids)[:1] if "c" not in ids or len(ids) > 1 else []
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in came if i != "c"]

    grid = Grid()
    started = time.monotonic()
    replies = send_and_receive(grid, [], timeout=0.5, interval=0.05)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"]
    assert 0.45 <= time.monotonic() - started < 1.5 and grid.pulls >= 5
