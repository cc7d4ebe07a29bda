"""The registry of stand-in kinds: for each `standin=` name, whether it needs a calibration file, the device bytes its
stand-ins take (counted in the budget by the plan) and what `patch` builds for it. Adding a kind is one entry here,
plus its machinery where it is new: a policy (`policies.py`) or a weight format (`bank.py`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hooks import MoEBlock
from offload_moe.budget import format_bytes
from offload_moe.errors import BudgetError
from offload_moe.geometry import ExpertGeometry
from offload_moe.runtime.counters import Counters
from offload_moe.runtime.miss import StandinPolicy
from offload_moe.runtime.store import HostStore
from offload_moe.runtime.transfer import TransferEngine
from offload_moe.standins import bank
from offload_moe.standins.catalog import GATED, StandinCatalog, assign_mixed, quant_expert_bytes
from offload_moe.standins.lowrank import rank_for_fraction
from offload_moe.standins.policies import Buddy, Drop, Substitute

if TYPE_CHECKING:
    from offload_moe.calibration import Calibration
    from offload_moe.options import OffloadOptions

STANDIN_BUDGET_SHARE = 0.4  # low-rank stand-ins never take more than this share of the budget: the pool needs the rest


@dataclass(frozen=True)
class Sizing:
    """What a kind's stand-ins take on the device."""

    nbytes: int = 0
    rank: int = 0  # low-rank stand-ins: their rank (0: none)
    kinds: tuple[tuple[str, ...], ...] | None = None  # "mixed": each expert's kind, per layer


@dataclass(frozen=True)
class BuildContext:
    """What building a kind's stand-ins may read: the options, the calibration, the model's blocks, where the experts
    live, the plan's sizing, and the link and counters (for one-use copies)."""

    options: OffloadOptions
    calib: Calibration | None
    blocks: list[MoEBlock]
    store: HostStore
    sizing: Sizing
    engine: TransferEngine
    counters: Counters
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class StandinKind:
    name: str
    calibration_for: str | None  # what a calibration file gives this kind; None: it needs none
    size: Callable[[ExpertGeometry, OffloadOptions, int, StandinCatalog | None], Sizing]
    build: Callable[[BuildContext], StandinPolicy]


def _nothing_resident(g: ExpertGeometry, options: OffloadOptions, budget_b: int, catalog) -> Sizing:
    return Sizing()


def _size_lowrank(g: ExpertGeometry, options: OffloadOptions, budget_b: int, catalog) -> Sizing:
    if set(g.shapes) != GATED:
        raise ValueError(f"standin='lowrank' needs gated experts (gate_up_proj, down_proj), not {sorted(g.shapes)}")
    share = min(options.standin_fraction, STANDIN_BUDGET_SHARE * budget_b / g.total_bytes)
    rank = rank_for_fraction(share, g.shapes)
    if catalog is not None:
        rank = min(rank, catalog.rank)  # the calibration's factors bound it
    if rank < 1:
        raise BudgetError(f"budget {format_bytes(budget_b)} leaves no room for rank-1 stand-ins; raise the budget")
    return Sizing(g.total_experts * rank * sum(a + b for a, b in g.shapes.values()) * g.itemsize, rank)


def _size_quant(g: ExpertGeometry, options: OffloadOptions, budget_b: int, catalog) -> Sizing:
    return Sizing(g.total_experts * quant_expert_bytes(g, options.bits, options.group_size))


def _size_mixed(g: ExpertGeometry, options: OffloadOptions, budget_b: int, catalog: StandinCatalog | None) -> Sizing:
    if catalog is None:
        raise ValueError("standin='mixed' needs a calibration file (calibration=...)")
    room = min(int(options.standin_fraction * g.total_bytes), budget_b - g.top_k * g.expert_bytes)
    kinds, nbytes = assign_mixed(catalog, catalog.kind_bytes(g), room, budget_b)
    return Sizing(nbytes, kinds=kinds)


def _drop(ctx: BuildContext) -> StandinPolicy:
    return Drop(ctx.options.critical_weight)


def _buddy(ctx: BuildContext) -> StandinPolicy:
    return Buddy(ctx.options.critical_weight, ctx.calib.buddies, ctx.calib.tau)


def _lowrank(ctx: BuildContext) -> StandinPolicy:
    b = bank.lowrank_bank(ctx.blocks, ctx.store, ctx.calib, ctx.sizing.rank, ctx.device, ctx.dtype)
    return Substitute(ctx.options.critical_weight, b)


def _quant(ctx: BuildContext) -> StandinPolicy:
    o = ctx.options
    b = bank.quant_bank(ctx.blocks, ctx.store, o.bits, o.group_size, o.quant_optimize, ctx.device, ctx.dtype)
    return Substitute(o.critical_weight, b)


def _mixed(ctx: BuildContext) -> StandinPolicy:
    b = bank.mixed_bank(ctx.blocks, ctx.store, ctx.calib, ctx.sizing.kinds, ctx.device, ctx.dtype)
    return Substitute(ctx.options.critical_weight, b)


def _lowbit(ctx: BuildContext) -> StandinPolicy:
    """HOBBIT: the low-bit copies stay on the host (pinned for CUDA) and are copied in for one use."""
    o = ctx.options
    b = bank.quant_bank(ctx.blocks, ctx.store, o.bits, o.group_size, o.quant_optimize, torch.device("cpu"), ctx.dtype)
    if ctx.device.type == "cuda":
        b.pin()
    return Substitute(o.critical_weight, b, _one_use_copies(ctx))


def _one_use_copies(ctx: BuildContext) -> bank.Fetch:
    """Copies of host tensors into fresh device buffers, now, as demand copies on the link, for one use (a missed
    expert's low-bit copy); counted as low-bit copies with their bytes and the wait."""

    def fetch(src: list[torch.Tensor]) -> list[torch.Tensor]:
        dst = [torch.empty(t.shape, dtype=t.dtype, device=ctx.device) for t in src]
        transfer = ctx.engine.submit(src, dst)
        ctx.counters.stall_seconds += transfer.wait()
        ctx.counters.lowbit_copies += 1
        ctx.counters.bytes_copied += transfer.nbytes
        return dst

    return fetch


KINDS: dict[str, StandinKind] = {
    k.name: k
    for k in (
        StandinKind("drop", None, _nothing_resident, _drop),
        StandinKind("buddy", "buddy lists", _nothing_resident, _buddy),
        StandinKind("lowrank", None, _size_lowrank, _lowrank),
        StandinKind("quant", None, _size_quant, _quant),
        StandinKind("mixed", "each expert's stand-in, chosen from calibration errors", _size_mixed, _mixed),
        StandinKind("lowbit", None, _nothing_resident, _lowbit),
    )
}
