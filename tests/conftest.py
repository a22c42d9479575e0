"""Shared fixtures: tiny exports of each role, the bundled digits, a quiet CPU trainer."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer

import lightning_modules  # noqa: F401  (importing it registers every stage)
from datamodules.mnist import BundledMNISTDataModule
from dcccl.artifacts.exports import NetworkExport, Role, save_export
from dcccl.backbones.spec import BackboneSpec
from dcccl.pipeline.boundary import ResolvedStage
from dcccl.pipeline.stages import STAGES
from dcccl.pipeline.steps import StageCall


def require_extra(module: str) -> Any:
    """Import an extra's ``module``: without it the test is skipped, except under CI (``CI`` set), where .ci/run
    installs every extra and a missing one must fail the run instead of skipping its tests silently."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


TINY = BackboneSpec("small_cnn", kwargs={"width": 4, "depth": 2})


def make_trainer(**overrides: Any) -> Trainer:
    """A fast, silent CPU trainer for tests."""
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=3, limit_val_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    options.update(overrides)
    return Trainer(**options)


@pytest.fixture
def trainer_factory() -> Callable[..., Trainer]:
    """Build a fast CPU trainer; keyword arguments override the defaults."""
    return make_trainer


@pytest.fixture
def digits() -> BundledMNISTDataModule:
    """The bundled digits with the default split (cloud 0-6, device 7-9)."""
    return BundledMNISTDataModule(batch_size=32)


@pytest.fixture
def export_factory(tmp_path: Path) -> Callable[..., Path]:
    """Write a freshly initialised tiny export of a role and return its path."""

    def _make(role: Role, name: str | None = None, sample_count: int | None = None, seed: int = 0,
              spec: BackboneSpec = TINY) -> Path:
        torch.manual_seed(seed)
        network = spec.build(10, 1)
        path = tmp_path / f"{name or role}.pt"
        save_export(NetworkExport.of(network, role, spec, 10, 1, sample_count), path)
        return path

    return _make


FAKE_SPEC = BackboneSpec("small_cnn", kwargs={"width": 2, "depth": 1})


def write_fake_export(path: Path, sample_count: int = 10) -> None:
    """A genuine, tiny export whose role follows the file name (what fake stage runners leave behind)."""
    role: Role = "cloud_submodel" if "cloud_submodel" in path.name else (
        "control_model" if "control_model" in path.name else "co_submodel")
    save_export(NetworkExport.of(FAKE_SPEC.build(10, 1), role, FAKE_SPEC, 10, 1, sample_count), path)


class RecordingRunner:
    """A fake stage runner: records every call and writes the outputs it promises (tiny genuine exports, and
    the metrics of :meth:`metrics` for evaluations); resolves every call to exactly what the plan asked for."""

    def __init__(self) -> None:
        self.calls: list[StageCall] = []
        self.resumed: list[bool] = []

    def metrics(self, call: StageCall, output: Path) -> dict[str, Any]:
        """What an evaluation writes."""
        raise NotImplementedError

    def resolve(self, call: StageCall) -> ResolvedStage:
        """The stage's expected module, the plan's arguments, the bundled digits."""
        module = STAGES[call.stage].module
        return ResolvedStage(module, module, module.data_partition, dict(call.model_args),
                             {"class_path": "datamodules.BundledMNISTDataModule", "init_args": dict(call.data_args)})

    def __call__(self, call: StageCall, resume: bool = False) -> None:
        self.calls.append(call)
        self.resumed.append(resume)
        for output in call.outputs:
            output.parent.mkdir(parents=True, exist_ok=True)
            if output.suffix == ".json":
                output.write_text(json.dumps(self.metrics(call, output)))
            else:
                write_fake_export(output)
