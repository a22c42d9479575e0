"""Inputs synthesised from a frozen network (model inversion), and distillation on them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.mnist import BundledMNISTDataModule
from dcccl.artifacts.exports import NetworkExport, load_network, save_export
from dcccl.backbones.spec import BackboneSpec
from dcccl.errors import ConfigError
from dcccl.model.inversion import InversionSettings, _BatchNormStatistics, invert_network, total_variation
from lightning_modules import ControlDistillationModule
from tests.conftest import TINY

FAST = InversionSettings(steps=30, chunk_size=16)
SPEC = BackboneSpec("small_cnn", kwargs={"width": 8, "depth": 2})


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    """A small network trained for 60 steps on the bundled digits (0-9), then frozen: every class reachable."""
    torch.manual_seed(0)
    network = SPEC.build(10, 1)
    data = BundledMNISTDataModule(batch_size=64)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    for step, (x, y) in enumerate(data.partition_loader("pooled")):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(x), y).backward()
        optimizer.step()
        if step == 59:
            break
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.eval()


def test_total_variation_of_a_hand_computed_image() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # vertical differences 2 and 3 (mean 2.5), horizontal 1 and 2 (mean 1.5)
    assert total_variation(x).item() == pytest.approx(4.0)


def test_inverted_inputs_get_their_target_class_and_leave_the_network_untouched(trained: torch.nn.Module) -> None:
    network = trained
    before = {k: v.clone() for k, v in network.state_dict().items()}
    targets = torch.arange(40) % 10
    x = invert_network(network, targets, (1, 28, 28), FAST, torch.Generator().manual_seed(0))
    assert x.shape == (40, 1, 28, 28) and torch.isfinite(x).all()
    with torch.no_grad():
        assert (network(x).argmax(1) == targets).float().mean() >= 0.9
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())  # weights and running stats
    assert all(p.grad is None for p in network.parameters())
    again = invert_network(network, targets, (1, 28, 28), FAST, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)  # the same noise, the same inputs


def test_the_batch_norm_prior_brings_the_inputs_statistics_to_the_network_s(trained: torch.nn.Module) -> None:
    network = trained
    targets = torch.arange(32) % 10

    def distance(x: torch.Tensor) -> float:
        statistics = _BatchNormStatistics(network)
        with torch.no_grad():
            network(x)
        value = statistics.take(x).item()
        statistics.close()
        return value

    without = invert_network(network, targets, (1, 28, 28), InversionSettings(steps=30, chunk_size=32,
                                                                              batch_norm_weight=0.0),
                             torch.Generator().manual_seed(0))
    with_prior = invert_network(network, targets, (1, 28, 28), InversionSettings(steps=30, chunk_size=32,
                                                                                 batch_norm_weight=1.0),
                                torch.Generator().manual_seed(0))
    assert distance(with_prior) < 0.5 * distance(without)


def test_inversion_refuses_a_network_in_training_mode_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        invert_network(TINY.build(10, 1).train(), torch.zeros(2, dtype=torch.long), (1, 8, 8))
    with pytest.raises(ConfigError, match="steps >= 1"):
        InversionSettings(steps=0)
    with pytest.raises(ConfigError, match="synthesised_inputs must be 0"):
        ControlDistillationModule(10, 1, cloud_submodel="unused.pt", synthesised_inputs=-1)


def test_distillation_on_synthesised_inputs_shows_them_beside_every_batch(
    trained: torch.nn.Module, digits: BundledMNISTDataModule, trainer_factory: Callable[..., Trainer], tmp_path: Path
) -> None:
    teacher_path = tmp_path / "cloud_submodel.pt"
    save_export(NetworkExport.of(trained, "cloud_submodel", SPEC, 10, 1, None), teacher_path)
    module = ControlDistillationModule(10, 1, cloud_submodel=str(teacher_path), backbone=TINY,
                                       synthesised_inputs=48, inversion=FAST)
    shown: list[int] = []
    module.control_model.register_forward_hook(lambda _, inputs, __: shown.append(len(inputs[0])))
    trainer_factory(max_steps=3, limit_val_batches=0).fit(module, datamodule=digits)
    assert module.synthesised is not None and module.synthesised.shape == (48, 1, 28, 28)
    assert shown[:3] == [64, 64, 64]  # 32 cloud samples and 32 synthesised inputs a step
    teacher = load_network(teacher_path, "cloud_submodel").eval()
    with torch.no_grad():
        answers = teacher(module.synthesised).argmax(1)
    assert set(answers.tolist()) <= set(range(7))  # the cloud's classes (0-6) only: targets cycle over those
    assert (answers == torch.arange(48) % 7).float().mean() >= 0.9
