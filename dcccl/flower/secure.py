"""A round's device copies averaged with Flower's SecAgg+: the cloud side.

Flower's ``SecAggPlusWorkflow`` runs the protocol (keys, shares, masked vectors, unmasking) over the grid and hands
the weighted mean it recovered to a strategy; :class:`MeanOnly` is that strategy: it names the round's nodes and the
co-submodel they start from, and keeps the mean. Each device trains as in a plain round (``dcccl.flower.client_app``'s
secure handler) and sends its update, which Flower's ``secaggplus_mod`` masks; the cloud never sees one device's
update. Every message of the protocol is counted (:class:`CountingGrid`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from dcccl.federated.secure_aggregation import SecureAggregation
from dcccl.flower.polling import DEFAULT_POLL_INTERVAL, send_and_receive
from dcccl.flower.records import payload_bytes

# The workflow's records in the ServerApp's state: the round and the parameters of the round.
MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, CURRENT_ROUND = "config", "parameters", "current_round"


class MeanOnly(Strategy):
    """The strategy SecAgg+'s workflow asks: which nodes train from what, and where the recovered mean goes.

    Args:
        fit_ins: The round's nodes, each with the co-submodel and the settings it trains with.
    """

    def __init__(self, fit_ins: list[tuple[ClientProxy, FitIns]]) -> None:
        self.fit_ins = fit_ins
        self.mean: Optional[list[np.ndarray]] = None
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Optional[Parameters]:
        """The pipeline holds the co-submodel: nothing to initialise."""
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The round's nodes, as the pipeline chose them."""
        return self.fit_ins

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Optional[Parameters], dict[str, Any]]:
        """Keep the mean SecAgg+ recovered (every result carries it) and what each device reported in the clear."""
        self.results, self.failures = results, failures
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            return results[0][1].parameters, {}
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[Any]:
        """Evaluation is the pipeline's own stage."""
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any],
                           failures: list[Any]) -> tuple[Optional[float], dict[str, Any]]:
        """Evaluation is the pipeline's own stage."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> Optional[tuple[float, dict[str, Any]]]:
        """Evaluation is the pipeline's own stage."""
        return None


@dataclass
class CountingGrid:
    """The grid, with every message SecAgg+ sends and receives counted: ``(node, stage, direction, payload bytes,
    message bytes)``."""

    grid: Grid
    poll_interval: float = DEFAULT_POLL_INTERVAL
    counted: list[tuple[int, str, str, int, int]] = field(default_factory=list)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        """Send ``messages`` through the grid and count them and their replies."""
        sent = list(messages)
        for message in sent:
            self._count(message.metadata.dst_node_id, message, "down")
        replies = send_and_receive(self.grid, sent, timeout, self.poll_interval)
        for reply in replies:
            if not reply.has_error():
                self._count(reply.metadata.src_node_id, reply, "up")
        return replies

    def _count(self, node: int, message: Message, direction: str) -> None:
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS, ConfigRecord())
        stage = str(configs.get(Key.STAGE, "")) or ("collect_masked_vectors" if Key.MASKED_PARAMETERS in configs
                                                    else "reply")
        masked = configs.get(Key.MASKED_PARAMETERS)
        payload = payload_bytes(message.content) + (_value_bytes(masked) if masked is not None else 0)
        total = payload_bytes(message.content) + sum(
            _value_bytes(value) + len(key) for record in message.content.config_records.values()
            for key, value in record.items()) + sum(
            8 + len(key) for record in message.content.metric_records.values() for key in record)
        self.counted.append((node, stage, direction, payload, total))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _value_bytes(value: Any) -> int:
    """Bytes of one config value (SecAgg+ sends lists of keys and shares, which Flower's own count refuses)."""
    if isinstance(value, (bytes, str)):
        return len(value.encode() if isinstance(value, str) else value)
    if isinstance(value, list):
        return sum(_value_bytes(item) for item in value)
    return 8


def secure_mean(grid: Grid, context: Context, nodes: list[int], start: list[np.ndarray], round_index: int,
                settings: SecureAggregation, weight_by_samples: bool,
                poll_interval: float = DEFAULT_POLL_INTERVAL) -> tuple[MeanOnly, CountingGrid]:
    """Run SecAgg+ for one round over ``nodes``, each starting from ``start``; the strategy holds the mean update
    (``None`` when the protocol halted) and every device's clear-text report, the grid every message's bytes. The
    grid checks for replies every ``poll_interval`` seconds."""
    fit_ins = FitIns(ndarrays_to_parameters(start), {"round": round_index, "weight-by-samples": weight_by_samples})
    strategy = MeanOnly([(GridClientProxy(node, grid, context.run_id), fit_ins) for node in nodes])
    legacy = LegacyContext(context, ServerConfig(num_rounds=1), strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({CURRENT_ROUND: round_index})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(fit_ins.parameters, True)
    counting = CountingGrid(grid, poll_interval)
    workflow = SecAggPlusWorkflow(settings.num_shares, settings.reconstruction_threshold,
                                  max_weight=settings.max_weight, clipping_range=settings.clipping_range,
                                  quantization_range=settings.quantization_range, timeout=settings.timeout)
    workflow(counting, legacy)  # type: ignore[arg-type]
    return strategy, counting
