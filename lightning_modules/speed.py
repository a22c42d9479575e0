"""Speed options as Lightning callbacks, given per stage (``trainer.callbacks``) or to every stage of a pipeline.

- :class:`ChannelsLast`: the stage's networks in the channels-last memory layout (faster convolutions on GPUs with
  tensor cores; each network's first convolution turns its input into that layout).
- :class:`CompileNetworks`: each network of the stage through ``torch.compile``, in place, so that its weights, its
  state dict and its exports stay those of the plain network.

A device round keeps its template (the device stage module) outside its children; both callbacks reach it too.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torchmetrics import Metric

log = logging.getLogger("dcccl")  # shown on global rank zero only (dcccl.commands.console)


def stage_networks(pl_module: LightningModule) -> list[tuple[str, nn.Module]]:
    """The networks a stage runs: its children that hold weights (metrics left out), and a device round's template's."""
    template = getattr(pl_module, "device_module", None)
    owners = [pl_module] + ([template] if isinstance(template, LightningModule) else [])
    return [(name, child) for owner in owners for name, child in owner.named_children()
            if not isinstance(child, Metric) and any(True for _ in child.parameters())]


class ChannelsLast(Callback):
    """Keeps the stage's networks in the channels-last memory layout (``torch.channels_last``)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Convert every network of the stage."""
        for _, network in stage_networks(pl_module):
            network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


class CompileNetworks(Callback):
    """Compiles each network of the stage with ``torch.compile`` (``nn.Module.compile``: in place, same state dict).

    The first steps are slow while the graphs compile; the stage's results are those of the plain networks up to the
    compiler's floating-point reordering.

    Args:
        backend: The compiler backend (``inductor``; ``eager`` or ``aot_eager`` to check a model compiles at all).
        mode: ``null``, ``reduce-overhead`` or ``max-autotune``.
        dynamic: Whether shapes are dynamic (``null``: torch decides; the last batch of an epoch is often smaller).
        fullgraph: Refuse graph breaks instead of running the rest eagerly.
    """

    def __init__(self, backend: str = "inductor", mode: Optional[str] = None, dynamic: Optional[bool] = None,
                 fullgraph: bool = False) -> None:
        self.options: dict[str, Any] = {"backend": backend, "mode": mode, "dynamic": dynamic, "fullgraph": fullgraph}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Compile every network of the stage (once: a network already compiled is left alone)."""
        names = []
        for name, network in stage_networks(pl_module):
            if getattr(network, "_compiled_call_impl", None) is None:
                network.compile(**self.options)
                names.append(name)
        if names:
            log.info(f"[dcccl] compiling {', '.join(names)} with torch.compile ({self.options['backend']})")
