"""The offload plan: from the experts' geometry, a budget and the options, how many device slots there are and what
the stand-ins take. Pure arithmetic, no model: every budget error is raised here, and tests check it directly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import budget_bytes, format_bytes
from .errors import BudgetError
from .options import OffloadOptions
from .standins import rank_for_fraction

STANDIN_BUDGET_SHARE = 0.4  # stand-ins never take more than this share of the budget: the pool needs the rest
GATED = {"gate_up_proj", "down_proj"}  # the layout low-rank stand-ins understand


@dataclass(frozen=True)
class ExpertGeometry:
    """Shape of the offloaded experts: `layers` MoE layers of `experts` experts each, `top_k` routed per token;
    `shapes[name]` is one expert's share of each stacked weight, stored with `itemsize` bytes per element."""

    layers: int
    experts: int
    top_k: int
    shapes: dict[str, tuple[int, ...]]
    itemsize: int

    @property
    def expert_bytes(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes.values()) * self.itemsize

    @property
    def total_experts(self) -> int:
        return self.layers * self.experts

    @property
    def total_bytes(self) -> int:
        return self.total_experts * self.expert_bytes


@dataclass(frozen=True)
class Plan:
    """What `patch` builds: `slots` device slots of `expert_bytes` each, plus stand-ins of `standin_bytes`."""

    budget_bytes: int
    expert_bytes: int
    slots: int
    standin_rank: int  # 0: no low-rank stand-ins
    standin_bytes: int
    total_experts: int

    @property
    def all_resident(self) -> bool:
        return self.slots == self.total_experts

    @property
    def device_expert_bytes(self) -> int:
        """Bytes of the slot pool plus the stand-ins: what the experts take on the device."""
        return self.slots * self.expert_bytes + self.standin_bytes


def make_plan(
    geometry: ExpertGeometry, budget: float | str, options: OffloadOptions, calibrated_rank: int | None = None
) -> Plan:
    """Size the pool and the stand-ins. calibrated_rank: the rank of a calibration file's stand-ins (an upper bound)."""
    g = geometry
    budget_b = budget_bytes(budget, g.total_bytes)
    rank = 0
    if options.standin == "lowrank":
        if set(g.shapes) != GATED:
            raise ValueError(f"standin='lowrank' needs gated experts (gate_up_proj, down_proj), not {sorted(g.shapes)}")
        share = min(options.standin_fraction, STANDIN_BUDGET_SHARE * budget_b / g.total_bytes)
        rank = rank_for_fraction(share, g.shapes)
        if calibrated_rank is not None:
            rank = min(rank, calibrated_rank)
        if rank < 1:
            raise BudgetError(f"budget {format_bytes(budget_b)} leaves no room for rank-1 stand-ins; raise the budget")
    standin_bytes = g.total_experts * rank * sum(a + b for a, b in g.shapes.values()) * g.itemsize if rank else 0
    slots = min((budget_b - standin_bytes) // g.expert_bytes, g.total_experts)
    if slots < g.top_k:
        need = g.top_k * g.expert_bytes + standin_bytes
        raise BudgetError(
            f"budget {format_bytes(budget_b)} holds {max(slots, 0)} expert(s) of {format_bytes(g.expert_bytes)}"
            + (f" besides {format_bytes(standin_bytes)} of stand-ins" if standin_bytes else "")
            + f", but one layer routes each token to {g.top_k}; raise the budget to at least {format_bytes(need)} "
            f"(a fraction of at least {need / g.total_bytes:.4f})"
        )
    return Plan(budget_b, g.expert_bytes, int(slots), rank, standin_bytes, g.total_experts)
