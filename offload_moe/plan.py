"""The offload plan: from the experts' geometry, a budget and the options, how many device slots there are and what
the stand-ins take. Pure arithmetic, no model: every budget error is raised here, and tests check it directly."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from offload_moe.budget import budget_bytes, format_bytes
from offload_moe.errors import BudgetError
from offload_moe.options import OffloadOptions
from offload_moe.standins.lowrank import rank_for_fraction
from offload_moe.standins.quant import quant_bytes

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
class StandinCatalog:
    """Candidate stand-ins measured by calibration: kinds ("quant4", "lowrank12", ...), errors [L, E, K] (relative
    output error on each expert's own inputs), frequencies [L, E] (tokens routed to each expert)."""

    rank: int
    kinds: tuple[str, ...]
    group_size: int
    errors: torch.Tensor
    frequencies: torch.Tensor

    def kind_bytes(self, g: ExpertGeometry) -> list[int]:
        per_rank = sum(a + b for a, b in g.shapes.values()) * g.itemsize if set(g.shapes) == GATED else 0
        return [quant_expert_bytes(g, int(k[5:]), self.group_size) if k.startswith("quant") else self.rank * per_rank
                for k in self.kinds]  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """What `patch` builds: `slots` device slots of `expert_bytes` each, plus stand-ins of `standin_bytes`."""

    budget_bytes: int
    expert_bytes: int
    slots: int
    standin_rank: int  # 0: no low-rank stand-ins
    standin_bytes: int
    total_experts: int
    standin_kinds: tuple[tuple[str, ...], ...] | None = None  # "mixed": each expert's stand-in kind, per layer

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
    """Size the pool and the stand-ins. catalog: a calibration's candidate stand-ins (its rank bounds lowrank's)."""
    g = geometry
    budget_b = budget_bytes(budget, g.total_bytes)
    rank, standin_bytes, kinds = 0, 0, None
    if options.standin == "mixed":
        if catalog is None:
            raise ValueError("standin='mixed' needs a calibration file (calibration=...)")
        room = min(int(options.standin_fraction * g.total_bytes), budget_b - g.top_k * g.expert_bytes)
        kinds, standin_bytes = assign_mixed(catalog, catalog.kind_bytes(g), room, budget_b)
    if options.standin == "quant":
        standin_bytes = g.total_experts * quant_expert_bytes(g, options.bits, options.group_size)
    if options.standin == "lowrank":
        if set(g.shapes) != GATED:
            raise ValueError(f"standin='lowrank' needs gated experts (gate_up_proj, down_proj), not {sorted(g.shapes)}")
        share = min(options.standin_fraction, STANDIN_BUDGET_SHARE * budget_b / g.total_bytes)
        rank = rank_for_fraction(share, g.shapes)
        if catalog is not None:
            rank = min(rank, catalog.rank)
        if rank < 1:
            raise BudgetError(f"budget {format_bytes(budget_b)} leaves no room for rank-1 stand-ins; raise the budget")
    if rank:
        standin_bytes = g.total_experts * rank * sum(a + b for a, b in g.shapes.values()) * g.itemsize
    slots = min((budget_b - standin_bytes) // g.expert_bytes, g.total_experts)
    if slots < g.top_k:
        need = g.top_k * g.expert_bytes + standin_bytes
        raise BudgetError(
            f"budget {format_bytes(budget_b)} holds {max(slots, 0)} expert(s) of {format_bytes(g.expert_bytes)}"
            + (f" besides {format_bytes(standin_bytes)} of stand-ins" if standin_bytes else "")
            + f", but one layer routes each token to {g.top_k}; raise the budget to at least {format_bytes(need)} "
            f"(a fraction of at least {need / g.total_bytes:.4f})"
        )
    return Plan(budget_b, g.expert_bytes, int(slots), rank, standin_bytes, g.total_experts, kinds)


def quant_expert_bytes(g: ExpertGeometry, bits: int, group: int) -> int:
    """One expert's quantized stand-in: its matrices at `bits`, anything else (biases) as stored."""
    return sum(quant_bytes(s, bits, group) if len(s) == 2 else torch.Size(s).numel() * g.itemsize
               for s in g.shapes.values())  # fmt: skip


def assign_mixed(catalog: StandinCatalog, kind_bytes: list[int], room: int, budget_b: int):
    """Each expert's stand-in kind under `room` bytes: start every expert at its cheapest candidate, then upgrade,
    greedily, where frequency x error saved per byte is largest. Returns (kinds per layer, bytes)."""
    errors = catalog.errors.double()  # [L, E, K]
    weight = catalog.frequencies.double() / catalog.frequencies.sum().clamp_min(1)  # [L, E]
    order = sorted(range(len(kind_bytes)), key=lambda k: kind_bytes[k])
    layers, experts = errors.shape[:2]
    choice = [[order[0]] * experts for _ in range(layers)]
    used = layers * experts * kind_bytes[order[0]]
    if used > room:
        raise BudgetError(
            f"budget {format_bytes(budget_b)} leaves {format_bytes(max(room, 0))} for stand-ins, but the cheapest "
            f"for every expert take {format_bytes(used)}; raise the budget or standin_fraction"
        )
    heap = []

    def push(layer: int, e: int) -> None:
        cur = choice[layer][e]
        for k in order:  # the best upgrade of this expert: error saved per extra byte
            extra = kind_bytes[k] - kind_bytes[cur]
            saved = float(weight[layer, e] * (errors[layer, e, cur] - errors[layer, e, k]))
            if extra > 0 and saved > 0:
                heapq.heappush(heap, (-saved / extra, layer, e, k, cur))

    for layer in range(layers):
        for e in range(experts):
            push(layer, e)
    while heap:
        _, layer, e, k, cur = heapq.heappop(heap)
        if choice[layer][e] != cur or used + kind_bytes[k] - kind_bytes[cur] > room:
            continue  # stale, or over the room: another, cheaper upgrade may still fit
        used += kind_bytes[k] - kind_bytes[cur]
        choice[layer][e] = k
        push(layer, e)
    return tuple(tuple(catalog.kinds[k] for k in row) for row in choice), used
