"""Fusion of the co-submodel's copies: pure averaging functions and one class per aggregation rule.

Every module of this package is imported here, so a rule added as a new file is known by its class name
(``aggregation: {class_path: MyRule}``) without touching any other file.
"""

import importlib
import pkgutil

from dcccl.federated.aggregation.fedadam import FedAdam
from dcccl.federated.aggregation.fedavg import FedAvg
from dcccl.federated.aggregation.fedavgm import FedAvgM
from dcccl.federated.aggregation.fedyogi import FedYogi
from dcccl.federated.aggregation.latest import LatestUpdate
from dcccl.federated.aggregation.rule import AggregationRule
from dcccl.federated.aggregation.server_optimizer import ServerOptimizer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AggregationRule", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "LatestUpdate", "ServerOptimizer"]
