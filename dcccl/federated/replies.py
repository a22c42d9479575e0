"""What a device sends back is checked before the cloud saves or fuses it: a device may lie, or break.

A reply is a copy of the co-submodel the device was sent, trained on the device's own samples, with the number of
those samples (its weight in fusion) and, for class-aware fusion, how many of them each class holds. The cloud knows
what it sent and, in a simulated fleet, each device's share; a reply is accepted only if it is a copy of the same
network (same backbone, classes, tensor names, shapes and dtypes), every value is finite, and its counts are
plausible: at least one sample, no more than the device holds, and samples per class that add up to the count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from dcccl.artifacts.exports import NetworkExport


@dataclass(frozen=True)
class ReplyVerdict:
    """The cloud's decision on one device reply.

    Args:
        device: The device that sent it (``-1``: the secure sum of a round's devices).
        round: The round the copy was trained in.
        accepted: Whether the reply is saved and fused.
        reason: Why it was refused (empty when accepted).
    """

    device: int
    round: int
    accepted: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The verdict as written to the run directory."""
        return {"device": self.device, "round": self.round, "accepted": self.accepted, "reason": self.reason}


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(size) for size in tensor.shape) + ")"


def weight_problems(weights: Mapping[str, Any], sent: Mapping[str, torch.Tensor]) -> list[str]:
    """What makes ``weights`` something other than a trained copy of ``sent``: missing or extra tensors, another
    shape or dtype, values that are not finite (empty: none)."""
    problems: list[str] = []
    missing = [key for key in sent if key not in weights]
    extra = [key for key in weights if key not in sent]
    if missing:
        problems.append(f"it lacks {len(missing)} of the co-submodel's tensors ({missing[0]}, ...)")
    if extra:
        problems.append(f"it carries {len(extra)} tensors the co-submodel does not have ({extra[0]}, ...)")
    for key, reference in sent.items():
        value = weights.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != reference.shape:
            problems.append(f"{key} has shape {_shape(value)} where the co-submodel's is {_shape(reference)}")
        elif value.dtype != reference.dtype:
            problems.append(f"{key} is {value.dtype} where the co-submodel's is {reference.dtype}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            problems.append(f"{key} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}")
    return problems


def count_problems(sample_count: Any, class_counts: Optional[Sequence[Any]], num_classes: int,
                   max_samples: Optional[int] = None) -> list[str]:
    """What is implausible in a reply's counts: a sample count that is not a whole number of at least one, or more
    than the device holds (``max_samples``, when the cloud knows it); samples per class that are not ``num_classes``
    whole numbers of at least zero adding up to the sample count (empty: nothing)."""
    if isinstance(sample_count, bool) or not isinstance(sample_count, int):
        return [f"its sample count is {sample_count!r}, not a whole number"]
    problems = []
    if sample_count < 1:
        problems.append(f"it reports {sample_count} samples, and a trained copy needs at least one")
    elif max_samples is not None and sample_count > max_samples:
        problems.append(f"it reports {sample_count:,} samples but the device holds {max_samples:,}")
    if class_counts is not None:
        counts = list(class_counts)
        if len(counts) != num_classes or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            problems.append(f"its samples per class are not {num_classes} whole numbers of at least zero")
        elif sum(counts) != sample_count:
            problems.append(f"its samples per class add up to {sum(counts):,}, not to the {sample_count:,} it reports")
    return problems


def reply_problems(reply: NetworkExport, sent: NetworkExport, max_samples: Optional[int] = None) -> list[str]:
    """Every reason to refuse ``reply``, a device's answer to being sent ``sent`` (empty: accept it).

    Args:
        reply: What the device sent back, as an export.
        sent: The co-submodel the device started from.
        max_samples: The most samples the device can hold (``None``: unknown).
    """
    problems = []
    if reply.role != "co_submodel":
        problems.append(f"it holds a {reply.role}, not a copy of the co-submodel")
    built_as = (reply.backbone.without_weights().to_dict(), reply.num_classes, reply.in_chans)
    if built_as != (sent.backbone.without_weights().to_dict(), sent.num_classes, sent.in_chans):
        problems.append(f"it is a {reply.backbone.name} for {reply.num_classes} classes and {reply.in_chans} channels, "
                        f"not the {sent.backbone.name} for {sent.num_classes} classes and {sent.in_chans} channels "
                        "that was sent")
    problems += weight_problems(reply.state_dict, sent.state_dict)
    problems += count_problems(reply.sample_count, reply.class_counts, sent.num_classes, max_samples)
    return problems
