"""The offload plan: from the experts' geometry, a budget and the options, how many device slots there are and what
the stand-ins take. Pure arithmetic, no model: every budget error is raised here, and tests check it directly."""

from __future__ import annotations

from dataclasses import dataclass

from offload_moe.budget import budget_bytes, format_bytes
from offload_moe.errors import BudgetError
from offload_moe.geometry import ExpertGeometry
from offload_moe.options import OffloadOptions
from offload_moe.standins.catalog import StandinCatalog
from offload_moe.standins.kinds import KINDS, Sizing


@dataclass(frozen=True)
class Plan:
    """What `patch` builds: `slots` device slots of `expert_bytes` each, plus stand-ins of `standin_bytes`."""

    budget_bytes: int
    expert_bytes: int
    slots: int
    total_experts: int
    sizing: Sizing  # what the stand-ins take, as their kind sized them

    @property
    def standin_bytes(self) -> int:
        return self.sizing.nbytes

    @property
    def all_resident(self) -> bool:
        return self.slots == self.total_experts

    @property
    def device_expert_bytes(self) -> int:
        """Bytes of the slot pool plus the stand-ins: what the experts take on the device."""
        return self.slots * self.expert_bytes + self.standin_bytes


def make_plan(
    geometry: ExpertGeometry, budget: float | str, options: OffloadOptions, catalog: StandinCatalog | None = None
) -> Plan:
    """Size the pool and the stand-ins (their kind sizes them). catalog: a calibration's candidate stand-ins."""
    g = geometry
    budget_b = budget_bytes(budget, g.total_bytes)
    sizing = KINDS[options.standin].size(g, options, budget_b, catalog) if options.standin else Sizing()
    standin_bytes = sizing.nbytes
    slots = min((budget_b - standin_bytes) // g.expert_bytes, g.total_experts)
    if slots < g.top_k:
        need = g.top_k * g.expert_bytes + standin_bytes
        raise BudgetError(
            f"budget {format_bytes(budget_b)} holds {max(slots, 0)} expert(s) of {format_bytes(g.expert_bytes)}"
            + (f" besides {format_bytes(standin_bytes)} of stand-ins" if standin_bytes else "")
            + f", but one layer routes each token to {g.top_k}; raise the budget to at least {format_bytes(need)} "
            f"(a fraction of at least {need / g.total_bytes:.4f})"
        )
    return Plan(budget_b, g.expert_bytes, int(slots), g.total_experts, sizing)
