"""Experts kept in their checkpoint's low-bit format: how one expert is laid out in packed tensors, and the scratch
its kernel passes decode into.

The slot pool, the RAM tier and every copy hold the packed tensors (`PackedLayout.parts`), so the budget and the
link count packed bytes. A kernel pass decodes the slots it reads into a scratch of those experts in the compute
dtype (`Unpacker`) and runs the stock kernel there, the pass's expert ids remapped to scratch rows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from offload_moe import compat
from offload_moe.formats import MatrixFormat

KEY_SEP = "@"  # pool part names: f"{weight}@{row}{suffix}", e.g. "gate_up_proj@0_blocks"


class PackedPiece(NamedTuple):
    """Rows `row:row + rows` (outputs) of the experts module's weight `weight`, stored as a [rows, cols] matrix (as
    a checkpoint stores it: outputs x inputs) in format `fmt`. cols 0: a vector (a bias)."""

    weight: str
    row: int
    rows: int
    cols: int
    fmt: MatrixFormat

    def part_names(self) -> dict[str, str]:
        """suffix -> the pool part it is stored as."""
        return {s: f"{self.weight}{KEY_SEP}{self.row}{s}" for s in self.fmt.parts(self.rows, self.cols)}


class PackedLayout:
    """One expert as packed pieces that decode into the experts module's weights `dense_shapes` in `dtype`.
    transposed: the module keeps its matrices [inputs, outputs] (transformers' is_transposed, as gpt-oss does)."""

    def __init__(
        self, pieces: list[PackedPiece], dense_shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, transposed: bool
    ):
        self.pieces, self.dense_shapes, self.dtype, self.transposed = pieces, dense_shapes, dtype, transposed
        self.parts: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # pool part -> (shape, dtype)
        for p in pieces:
            for suffix, (shape, dt) in p.fmt.parts(p.rows, p.cols).items():
                self.parts[p.part_names()[suffix]] = (shape, dt)
        self.expert_bytes = sum(torch.Size(s).numel() * dt.itemsize for s, dt in self.parts.values())
        self.formats = sorted({p.fmt.name for p in pieces})

    def decode(
        self, parts: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """n experts' weights [n, *dense shape] from their packed parts ([n, *part shape] each), written into `out`
        (scratch views of n rows) where given."""
        n = next(iter(parts.values())).shape[0]
        if out is None:
            dev = next(iter(parts.values())).device
            out = {w: torch.empty((n, *s), dtype=self.dtype, device=dev) for w, s in self.dense_shapes.items()}
        for p in self.pieces:
            names = p.part_names()
            w = p.fmt.decode({s: parts[names[s]] for s in names}, p.rows, p.cols, self.dtype)  # [n, rows, cols]
            dst = out[p.weight]
            if w.dim() == 2:  # a bias [n, rows]
                dst[:, p.row : p.row + p.rows] = w
            elif self.transposed:
                dst[:, :, p.row : p.row + p.rows] = w.transpose(1, 2)
            else:
                dst[:, p.row : p.row + p.rows] = w
        return out


class Unpacker:
    """The scratch a kernel pass decodes its packed experts into: [n, *dense shape] per weight on `device`, grown to
    the most experts a pass has read (at most one layer's)."""

    def __init__(self, layout: PackedLayout, device: torch.device):
        self.layout, self.device = layout, device
        self.scratch: dict[str, torch.Tensor] = {}
        self._grow(compat.MASKED_WINDOW)

    def _grow(self, n: int) -> None:
        self.scratch = {
            w: torch.zeros((n, *s), dtype=self.layout.dtype, device=self.device)
            for w, s in self.layout.dense_shapes.items()
        }

    def decode(self, pool: dict[str, torch.Tensor], slots: list[int]) -> None:
        """Decode the experts in pool `slots` into scratch rows 0..len(slots)-1, in that order."""
        n, capacity = len(slots), len(next(iter(self.scratch.values())))
        if n > capacity:
            self._grow(max(n, 2 * capacity))
        lo = slots[0]
        if slots == list(range(lo, lo + n)):  # consecutive: views, no gather
            parts = {k: t[lo : lo + n] for k, t in pool.items()}
        else:
            idx = torch.tensor(slots, device=self.device)
            parts = {k: t.index_select(0, idx) for k, t in pool.items()}
        self.layout.decode(parts, {w: t[:n] for w, t in self.scratch.items()})

    @staticmethod
    def remap(ids: np.ndarray, experts: list[int], num_experts: int, window: int) -> np.ndarray:
        """[T, K] routed expert ids -> scratch rows of the pass over `experts` (in that order); `window` for the
        pairs outside it (the kernels' skip id)."""
        pos = np.full(num_experts, window, dtype=np.int64)
        pos[experts] = np.arange(len(experts))
        return pos[ids]
