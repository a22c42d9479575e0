"""Server-side optimisation of the co-submodel: the round's fused update taken as a pseudo-gradient.

FedAvg moves the co-submodel to the weighted mean of the round's copies. A server optimiser (Reddi et al.,
"Adaptive Federated Optimization", 2021) instead treats ``mean - start`` as a gradient step and feeds it to an
optimiser of its own, with a learning rate and state (momentum, moments) carried from round to round. Many small
updates from devices holding a sample or two then add up across rounds instead of vanishing in the average.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Set
from typing import TYPE_CHECKING, Optional

import torch

from dcccl.errors import ConfigError
from dcccl.federated.aggregation.averaging import DeviceWeighting
from dcccl.federated.aggregation.fedavg import FedAvg
from dcccl.federated.aggregation.latest import latest_copies
from dcccl.federated.aggregation.rule import ServerState, StateDict

if TYPE_CHECKING:
    from dcccl.federated.fleet import FleetSpec

Tensors = dict[str, torch.Tensor]


def pseudo_gradient(mean: StateDict, start: StateDict, parameters: Set[str]) -> Tensors:
    """``mean - start`` for every trainable parameter, in float64 (the direction the round moved the model)."""
    return {key: mean[key].detach().to(torch.float64) - start[key].detach().to(torch.float64)
            for key in sorted(parameters)}


def apply_update(start: StateDict, mean: StateDict, update: Mapping[str, torch.Tensor]) -> Tensors:
    """``start + update`` for the parameters ``update`` names, the mean's values for the rest (buffers such as
    batch-norm statistics are averaged, not optimised), each entry in the start's dtype."""
    return {key: (start[key].to(torch.float64) + update[key]).to(start[key].dtype) if key in update
            else value.clone() for key, value in mean.items()}


class ServerOptimizer(FedAvg):
    """FedAvg's weighted mean of the copies (cloud share, device weighting and class-aware rows as in
    :class:`FedAvg`), turned into a step of a server optimiser whose state is kept in the run directory.

    A subclass fills :meth:`update`: from the round's pseudo-gradient and the state it kept, the step to apply and
    the state to keep.

    Args:
        server_lr: The server's learning rate.
        latest_updates: Fuse every device's most recent copy, not only this round's (as :class:`LatestUpdate`).
        cloud_share: λ, the cloud copy's share in the mean; ``null`` weights it by its sample count like a device.
        device_weighting: Split the devices' share by sample counts (``samples``) or equally (``uniform``).
        class_aware_head: Fuse the classifier's rows class by class (see :class:`FedAvg`).
    """

    def __init__(self, server_lr: float = 1.0, latest_updates: bool = False, cloud_share: Optional[float] = 0.5,
                 device_weighting: DeviceWeighting = "samples", class_aware_head: bool = False) -> None:
        super().__init__(cloud_share, device_weighting, class_aware_head)
        if not server_lr > 0:
            raise ConfigError(f"aggregation server_lr must be positive, got {server_lr}")
        self.server_lr = server_lr
        self.latest_updates = latest_updates

    @property
    def keeps_server_state(self) -> bool:
        """The optimiser's state goes from one round's fusion to the next."""
        return True

    def secure_aggregation_refusal(self) -> Optional[str]:
        """Like FedAvg (the optimiser needs only the mean), unless offline devices' updates are re-applied."""
        if self.latest_updates:
            return "latest_updates needs each device's last update in the clear"
        return super().secure_aggregation_refusal()

    def fused_copies(self, fleet: FleetSpec, seed: int, round_index: int) -> list[tuple[int, int]]:
        """This round's copies, or with ``latest_updates`` every device's most recent one."""
        if self.latest_updates:
            return latest_copies(fleet, seed, round_index)
        return super().fused_copies(fleet, seed, round_index)

    def server_step(self, mean: StateDict, start: StateDict, parameters: Set[str], state: ServerState,
                    round_index: int) -> tuple[dict[str, torch.Tensor], ServerState]:
        """``start`` moved by the optimiser's step on the pseudo-gradient ``mean - start``."""
        delta = pseudo_gradient(mean, start, parameters)
        for name, group in state.items():
            wrong = sorted(key for key in group if key not in delta or group[key].shape != delta[key].shape)
            if set(group) != set(delta) or wrong:
                raise ConfigError(f"the kept server state {name!r} does not fit the co-submodel (e.g. {wrong[:3]}): "
                                  "run the rounds again (--from_stage rounds)")
        update, kept = self.update(delta, state, round_index)
        return apply_update(start, mean, update), kept

    @abstractmethod
    def update(self, delta: Tensors, state: ServerState, round_index: int) -> tuple[Tensors, ServerState]:
        """The step to add to the round's start, and the state to keep, from the pseudo-gradient ``delta``.

        Args:
            delta: ``mean - start`` per trainable parameter (float64).
            state: What this method returned as state after the previous round (empty in round 1).
            round_index: The round (counted from 1).
        """
