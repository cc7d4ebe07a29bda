"""What the experts hook hands a stand-in policy when a layer call misses, and what the policy hands back: the
interface between the runtime and the lossy stand-ins (`offload_moe.standins`), declared here below both."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCall:
    """One call of a layer's experts whose routed experts are not all ready on the device."""

    layer: int
    hidden: torch.Tensor  # [T, H]
    index: torch.Tensor  # [T, K] expert ids
    weights: torch.Tensor  # [T, K] routing weights
    needed: list[int]  # distinct experts routed to
    missing: set[int]  # ... of which not ready on the device
    resident: set[int]  # every ready expert of the layer


@dataclass
class MissPlan:
    """How a layer call's routed pairs are served."""

    index: torch.Tensor  # [T, K] expert ids to run (buddy may remap some)
    weights: torch.Tensor  # [T, K] their weights; 0 for pairs a stand-in serves
    exact: set[int]  # missing experts some pair still needs exactly (copied or computed on the host)
    extra: torch.Tensor | None = None  # [T, H] contribution of the stand-ins
    substituted: int = 0  # pairs not served by their real expert


class StandinPolicy:
    """Decides, for a layer call with misses, which pairs a stand-in serves and which missed experts stay exact.
    critical_weight: a missed pair with at least this routing weight is served exactly."""

    def __init__(self, critical_weight: float):
        self.critical_weight = critical_weight  # validated by OffloadOptions

    def plan(self, call: LayerCall) -> MissPlan:
        raise NotImplementedError

    def _critical(self, index: torch.Tensor, weights: torch.Tensor, miss: torch.Tensor) -> set[int]:
        """Missing experts that some token needs with a weight >= critical_weight."""
        return set(index[miss & (weights >= self.critical_weight)].tolist())
