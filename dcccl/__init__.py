"""dcccl: device-cloud collaborative controlled learning (DC-CCL) on PyTorch Lightning.

The core package is plain PyTorch: the method (``method``), backbones (``backbones``), the fleet and its
aggregation rules (``federated``), the plan and its coordinator (``run``), the compared methods (``methods``),
reports (``reporting``) and deployment (``deploy``). Stage LightningModules live in ``lightning_modules``,
DataModules in ``datamodules`` and the command line in ``cli``; ``docs/architecture.md`` maps it all.
"""

__version__ = "0.1.0"
