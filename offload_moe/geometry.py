"""The shape of a model's offloaded experts: what every byte count of a plan is computed from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertGeometry:
    """Shape of the offloaded experts: `layers` MoE layers of `experts` experts each, `top_k` routed per token;
    `shapes[name]` is one expert's share of each stacked weight, computed with `itemsize` bytes per element.
    packed_bytes: what one expert takes when it is stored in its checkpoint's low-bit format (`load`), else None."""

    layers: int
    experts: int
    top_k: int
    shapes: dict[str, tuple[int, ...]]
    itemsize: int
    packed_bytes: int | None = None

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert as the pool and every copy hold it."""
        if self.packed_bytes is not None:
            return self.packed_bytes
        return sum(torch.Size(s).numel() for s in self.shapes.values()) * self.itemsize

    @property
    def total_experts(self) -> int:
        return self.layers * self.experts

    @property
    def total_bytes(self) -> int:
        return self.total_experts * self.expert_bytes
