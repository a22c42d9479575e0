"""Compressed transfers of the co-submodel: what crosses the boundary is an update, encoded, and counted in the bytes
its encoding takes.

Two codecs, each applied to every floating-point tensor of an update (integer buffers go as they are):

- ``int8``: per-tensor symmetric quantisation, ``q = round(x / s)`` with ``s = max|x| / 127``; one byte per entry plus
  the scale. Each entry comes back within ``s / 2`` of what was sent.
- ``topk``: the ``fraction`` of each tensor's entries largest in magnitude, as (int32 index, float32 value) pairs.
  Every entry left out is no larger in magnitude than the smallest one sent.

With error feedback the part an encoding dropped is kept by the sender and added to its next update, so nothing is
lost for good: ``sent + residual`` always equals ``update + previous residual`` exactly.

Down, the cloud sends the round's co-submodel as its difference from what the device holds from the last round it
took part in (a device's first round gets the full co-submodel: int8-quantised, or dense for ``topk``); the device's
held model is exactly what it decoded, so what one round's encoding dropped is part of the next round's difference.
Up, the device sends its trained copy minus what it received, with its own residual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import torch

from dcccl.errors import ConfigError

StateDict = Mapping[str, torch.Tensor]
Codec = Literal["int8", "topk"]
INDEX_BYTES = 4  # int32 positions of top-k entries
SCALE_BYTES = 4  # one float32 scale per int8 tensor


def quantize_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor symmetric int8 quantisation: ``(q, scale)`` with ``tensor ≈ q * scale``, ``|error| <= scale / 2``."""
    values = tensor.detach().float()
    peak = values.abs().max() if values.numel() else torch.zeros(())
    scale = (peak / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(values / scale).clamp(-127, 127).to(torch.int8), scale.to(torch.float32)


def dequantize_int8(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float values an int8 tensor and its scale stand for."""
    return quantized.float() * scale


def top_k(tensor: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``ceil(fraction * numel)`` entries largest in magnitude: ``(int32 flat positions, float32 values)``."""
    flat = tensor.detach().float().flatten()
    count = min(flat.numel(), max(1, math.ceil(fraction * flat.numel()))) if flat.numel() else 0
    positions = torch.topk(flat.abs(), count, sorted=False).indices if count else torch.zeros(0, dtype=torch.long)
    return positions.to(torch.int32), flat[positions]


def scatter_top_k(positions: torch.Tensor, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The dense tensor shaped as ``like`` that holds ``values`` at ``positions`` and zeros elsewhere."""
    dense = torch.zeros(like.numel(), dtype=torch.float32)
    dense[positions.long()] = values
    return dense.reshape(like.shape)


@dataclass(frozen=True)
class Compression:
    """How the co-submodel crosses the boundary each round.

    Args:
        codec: ``int8`` (per-tensor scale) or ``topk`` (the largest entries of each tensor).
        fraction: For ``topk``: the share of each tensor's entries sent (0 < fraction <= 1).
        error_feedback: Keep what an encoding dropped and add it to the next update (per device, each way).
        directions: Compress ``both`` ways, only ``up`` (the devices' copies) or only ``down``.
    """

    codec: Codec = "int8"
    fraction: float = 0.1
    error_feedback: bool = True
    directions: Literal["both", "up", "down"] = "both"

    def __post_init__(self) -> None:
        if self.codec not in ("int8", "topk"):
            raise ConfigError(f"compression.codec must be 'int8' or 'topk', got {self.codec!r}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"compression.fraction must lie in (0, 1], got {self.fraction}")
        if self.directions not in ("both", "up", "down"):
            raise ConfigError(f"compression.directions must be 'both', 'up' or 'down', got {self.directions!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, as a config file would give it."""
        return asdict(self)

    @property
    def compresses_down(self) -> bool:
        """Whether the cloud's co-submodel is sent compressed."""
        return self.directions in ("both", "down")

    @property
    def compresses_up(self) -> bool:
        """Whether the devices' copies are sent compressed."""
        return self.directions in ("both", "up")

    def round_trip(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """What the receiver decodes of one float tensor, and the bytes its encoding takes."""
        if self.codec == "int8":
            quantized, scale = quantize_int8(tensor)
            return dequantize_int8(quantized, scale).to(tensor.dtype), quantized.numel() + SCALE_BYTES
        positions, values = top_k(tensor, self.fraction)
        return scatter_top_k(positions, values, tensor).to(tensor.dtype), positions.numel() * (
            INDEX_BYTES + values.element_size())

    def send_update(self, update: StateDict, residual: Optional[StateDict]) -> tuple[dict[str, torch.Tensor],
                                                                                      dict[str, torch.Tensor], int]:
        """Encode ``update`` (plus the sender's ``residual`` with error feedback): what the receiver decodes, the
        sender's new residual (empty without error feedback) and the bytes sent."""
        decoded: dict[str, torch.Tensor] = {}
        kept: dict[str, torch.Tensor] = {}
        sent_bytes = 0
        for key, value in update.items():
            if not value.is_floating_point():  # counters (num_batches_tracked) go as they are
                decoded[key] = value.clone()
                sent_bytes += value.numel() * value.element_size()
                continue
            corrected = value.float() + (residual[key].float() if residual and key in residual else 0.0)
            received, size = self.round_trip(corrected)
            decoded[key] = received.to(value.dtype)
            sent_bytes += size
            if self.error_feedback:
                kept[key] = corrected - received.float()
        return decoded, kept, sent_bytes

    def send_down(self, model: StateDict, held: Optional[StateDict]) -> tuple[dict[str, torch.Tensor], int]:
        """What a device decodes of the round's co-submodel ``model``, given what it ``held`` from its last round
        (``None``: nothing yet), and the bytes sent."""
        if not self.compresses_down:
            return {key: value.clone() for key, value in model.items()}, state_bytes(model)
        if held is None:
            return self.send_model(model)
        decoded, _, size = self.send_update(difference(model, held), None)  # the held model mirrors what was sent
        return apply_update(held, decoded), size

    def send_up(self, trained: StateDict, received: StateDict,
                residual: Optional[StateDict]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """The copy the cloud decodes of a device's ``trained`` copy (which started from ``received``), the device's
        new residual and the bytes sent."""
        if not self.compresses_up:
            return {key: value.clone() for key, value in trained.items()}, {}, state_bytes(trained)
        decoded, kept, size = self.send_update(difference(trained, received), residual)
        return apply_update(received, decoded), kept, size

    def send_model(self, model: StateDict) -> tuple[dict[str, torch.Tensor], int]:
        """A full co-submodel to a device that holds none yet: int8-quantised, or dense float for ``topk``."""
        if self.codec == "topk":
            return {key: value.clone() for key, value in model.items()}, state_bytes(model)
        decoded, _, size = Compression("int8", error_feedback=False).send_update(model, None)
        return decoded, size


def state_bytes(state: StateDict) -> int:
    """Bytes of a state dict's tensors sent as they are."""
    return sum(value.numel() * value.element_size() for value in state.values())


def difference(later: StateDict, earlier: StateDict) -> dict[str, torch.Tensor]:
    """``later - earlier`` for floating-point tensors; integer buffers keep ``later``'s value (they are not added)."""
    return {key: later[key] - earlier[key] if later[key].is_floating_point() else later[key].clone() for key in later}


def apply_update(base: StateDict, update: StateDict) -> dict[str, torch.Tensor]:
    """``base + update`` for floating-point tensors; integer buffers take ``update``'s value."""
    return {key: (base[key] + update[key]).to(base[key].dtype) if base[key].is_floating_point()
            else update[key].clone() for key in base}
