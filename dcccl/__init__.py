"""dcccl: device-cloud collaborative controlled learning (DC-CCL) on PyTorch Lightning.

The core package is plain PyTorch: backbones, the summed served model, state-dict aggregation,
data partitioning, the run directory and the pipeline coordinator. Stage LightningModules live in
``lightning_modules``, DataModules in ``datamodules`` and the command line in ``cli``.
"""

__version__ = "0.1.0"
