"""Cost figures against values worked out by hand for small known networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcccl.federated.costs import (
    control_fidelity,
    parameter_count,
    peak_training_memory_bytes,
    state_dict_bytes,
    training_flops_per_sample,
)


def test_parameter_count_and_bytes_of_a_known_network() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    # Linear: 4*3 weights + 3 biases = 15; BatchNorm1d: 3 weights + 3 biases = 6 -> 21 parameters.
    assert parameter_count(net) == 21
    # Bytes: 21 float32 parameters (84) + running mean and var (2*3 float32 = 24) + num_batches_tracked (int64, 8).
    assert state_dict_bytes(net) == 84 + 24 + 8
    assert state_dict_bytes(net.state_dict()) == 116
    assert parameter_count(nn.Linear(4, 3), nn.Linear(3, 2)) == 15 + 8


def test_training_flops_of_a_linear_layer() -> None:
    net = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    # Forward matmul: 2*B*4*3; backward: only the weight gradient (the input needs none): 2*B*4*3.
    # Per sample: 4*4*3 = 48.
    assert training_flops_per_sample(net, x, y) == 48
    # A frozen guide adds its forward only: 2*4*3 = 24 per sample.
    guide = nn.Linear(4, 3).requires_grad_(False)
    assert training_flops_per_sample(net, x, y, guide) == 48 + 24
    assert all(p.grad is None for p in net.parameters())  # measuring leaves no gradients behind


def test_cpu_peak_memory_counts_weights_gradients_optimizer_state_and_activations() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    measured = peak_training_memory_bytes(net, x, y)
    weights = 15 * 4
    # Adam keeps two float32 moments per parameter and one step counter per parameter tensor (2 tensors).
    fixed = weights + weights + 2 * weights + 2 * 4 + x.numel() * 4 + y.numel() * 8
    assert measured > fixed
    doubled = peak_training_memory_bytes(net, torch.cat([x, x]), torch.cat([y, y]))
    assert doubled > measured  # activations and the batch grow with it
    sgd = peak_training_memory_bytes(net, x, y, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    assert measured - sgd == 2 * weights + 2 * 4  # exactly Adam's state


def test_control_fidelity_by_hand() -> None:
    cloud = nn.Linear(4, 3)
    shifted = nn.Linear(4, 3)
    shifted.load_state_dict(cloud.state_dict())
    with torch.no_grad():
        shifted.bias += 0.5  # the same argmax everywhere, every logit off by 0.5
    batches = [(torch.randn(6, 4), torch.zeros(6, dtype=torch.long)) for _ in range(3)]
    same = control_fidelity(cloud, cloud, batches)
    assert same == {"agreement": 1.0, "logit_mse": 0.0}
    off = control_fidelity(cloud, shifted, batches)
    assert off["agreement"] == 1.0 and off["logit_mse"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        control_fidelity(cloud, shifted, [])
