"""What running on a device costs: parameters, bytes on the wire, training FLOPs and memory of a step.

All figures are measured on the real networks: FLOPs with ``torch.utils.flop_counter`` over one training
step, memory from the tensors that step actually holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def parameter_count(*networks: nn.Module) -> int:
    """Number of parameters of the given networks together."""
    return sum(p.numel() for network in networks for p in network.parameters())


def state_dict_bytes(state: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors in a state dict (weights and buffers): what sending the network costs."""
    tensors = state.state_dict() if isinstance(state, nn.Module) else state
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _guided_loss(trainable: nn.Module, guide: Optional[nn.Module], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = trainable(x)
    if guide is not None:
        with torch.no_grad():
            guide_logits = guide(x)
        logits = logits + guide_logits
    return F.cross_entropy(logits, y)


def training_flops_per_sample(trainable: nn.Module, x: torch.Tensor, y: torch.Tensor,
                              guide: Optional[nn.Module] = None) -> float:
    """FLOPs of one training step (forward of the frozen guide, forward and backward of ``trainable``) per sample."""
    was_training = trainable.training
    trainable.train()
    counter = FlopCounterMode(display=False)
    with counter:
        _guided_loss(trainable, guide, x, y).backward()
    trainable.zero_grad(set_to_none=True)
    trainable.train(was_training)
    return counter.get_total_flops() / x.shape[0]


def peak_training_memory_bytes(trainable: nn.Module, x: torch.Tensor, y: torch.Tensor,
                               guide: Optional[nn.Module] = None,
                               optimizer_factory: OptimizerFactory = torch.optim.Adam) -> int:
    """Memory one training step holds at its peak, in bytes.

    On CUDA this is the allocator's peak. On the CPU it is the sum of what the step keeps alive at the
    end of the forward pass and after the optimizer step: parameters and buffers of both networks, the
    input batch, the activations autograd saved for the backward pass (counted once per storage), the
    gradients and the optimizer state.
    """
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        optimizer = optimizer_factory(trainable.parameters())
        _guided_loss(trainable, guide, x, y).backward()
        optimizer.step()
        peak = torch.cuda.max_memory_allocated(x.device) - base
        trainable.zero_grad(set_to_none=True)
        return int(peak)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    optimizer = optimizer_factory(trainable.parameters())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _guided_loss(trainable, guide, x, y)
    loss.backward()
    optimizer.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable.parameters() if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    networks = state_dict_bytes(trainable) + (state_dict_bytes(guide) if guide is not None else 0)
    trainable.zero_grad(set_to_none=True)
    batch = x.numel() * x.element_size() + y.numel() * y.element_size()
    return int(networks + batch + sum(saved.values()) + grads + state)


@torch.no_grad()
def control_fidelity(cloud_submodel: nn.Module, control_model: nn.Module,
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """How well the control model mimics the cloud submodel: top-1 agreement and mean squared logit error."""
    agree, squared, count, entries = 0, 0.0, 0, 0
    cloud_submodel.eval()
    control_model.eval()
    for x, _ in batches:
        teacher, student = cloud_submodel(x), control_model(x)
        agree += int((teacher.argmax(1) == student.argmax(1)).sum())
        squared += float(((teacher - student) ** 2).sum())
        count += x.shape[0]
        entries += teacher.numel()
    if count == 0:
        raise ValueError("no samples to measure control-model fidelity on")
    return {"agreement": agree / count, "logit_mse": squared / entries}
