"""What calibration measured of the candidate stand-ins ("quant4", "lowrank12", ...), their sizes, and the choice of
each expert's stand-in under one byte budget (standin="mixed")."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from offload_moe.budget import format_bytes
from offload_moe.errors import BudgetError
from offload_moe.geometry import ExpertGeometry
from offload_moe.standins.quant import quant_bytes

GATED = {"gate_up_proj", "down_proj"}  # the layout low-rank stand-ins understand


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
        return [
            quant_expert_bytes(g, int(k[5:]), self.group_size) if k.startswith("quant") else self.rank * per_rank
            for k in self.kinds
        ]


def quant_expert_bytes(g: ExpertGeometry, bits: int, group: int) -> int:
    """One expert's quantized stand-in: its matrices at `bits`, anything else (biases) as stored."""
    return sum(
        quant_bytes(s, bits, group) if len(s) == 2 else torch.Size(s).numel() * g.itemsize for s in g.shapes.values()
    )


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
