"""Fusion of the co-submodel's copies: pure averaging functions and one class per aggregation rule.

Each rule registers itself (``@register_rule`` on its class); every module of this package is imported here, so a rule
added as a new file is known by its class name (``aggregation: {class_path: MyRule}``) without touching any other file.
"""

from dcccl.federated.aggregation.fedadam import FedAdam
from dcccl.federated.aggregation.fedavg import FedAvg
from dcccl.federated.aggregation.fedavgm import FedAvgM
from dcccl.federated.aggregation.fedyogi import FedYogi
from dcccl.federated.aggregation.latest import LatestUpdate
from dcccl.federated.aggregation.rule import RULES, AggregationRule, register_rule
from dcccl.federated.aggregation.server_optimizer import ServerOptimizer
from dcccl.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["RULES", "AggregationRule", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "LatestUpdate", "ServerOptimizer",
           "register_rule"]
