"""The middle tier of a checkpoint read from disk: a budget of experts kept in (pinned) RAM between the disk and the
device, so an expert the device evicted comes back over the bus instead of from the disk again.

A copy to the device of an expert the tier holds reads the tier's slot (a hit); of one it does not, reads the
checkpoint and lands the bytes in a tier slot on the way (a miss), evicting the least recently used expert there.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from offload_moe.runtime.disk import FileSpan
from offload_moe.runtime.store import Piece
from offload_moe.runtime.transfer import Transfer
from offload_moe.runtime.types import ExpertKey


class RamTier:
    """`slots` experts in RAM ([slots, ...] per part, pinned for a CUDA device), least recently used evicted.
    parts: what one expert is stored as, part name -> (shape, dtype) (`HostStore.pool_parts`)."""

    def __init__(self, parts: dict[str, tuple[tuple[int, ...], torch.dtype]], slots: int, pin: bool):
        if slots < 1:
            raise ValueError("a RAM tier needs at least one slot")
        self.pool = {n: torch.empty((slots, *s), dtype=dt, pin_memory=pin) for n, (s, dt) in parts.items()}
        self._slot_of: OrderedDict[ExpertKey, int] = OrderedDict()  # least recently used first
        self._free = list(range(slots - 1, -1, -1))
        self._filled_by: dict[int, Transfer] = {}  # slot -> the last copy that filled or read it
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool.values())

    def sources(self, key: ExpertKey, pieces: list[Piece]) -> list[torch.Tensor | FileSpan]:
        """What a copy of `key` to the device reads: the tier's slot when it holds the expert, else the file spans,
        landing in a slot claimed for it now."""
        slot = self._slot_of.get(key)
        last = self._filled_by.get(slot) if slot is not None else None
        if slot is not None and last is not None and last.failed():  # its bytes never arrived: read them again
            del self._slot_of[key], self._filled_by[slot]
            self._free.append(slot)
            slot = None
        if slot is not None:
            self._slot_of.move_to_end(key)
            self.hits += 1
            if last is not None:
                last.wait()  # still filling (never expected: the device holds an expert while its copy runs)
            return [self._rows(p, slot) for p in pieces]
        self.misses += 1
        slot = self._claim(key)
        return [p.span.landing_in(self._rows(p, slot)) for p in pieces]

    def used_by(self, key: ExpertKey, transfer: Transfer) -> None:
        """`transfer` fills or reads `key`'s slot: the slot is not reused before it is done."""
        self._filled_by[self._slot_of[key]] = transfer

    def _rows(self, piece: Piece, slot: int) -> torch.Tensor:
        return self.pool[piece.name][slot, piece.row : piece.row + piece.src.shape[0]]

    def _claim(self, key: ExpertKey) -> int:
        if not self._free:
            _, slot = self._slot_of.popitem(last=False)
            last = self._filled_by.pop(slot, None)
            if last is not None and not last.done():
                with contextlib.suppress(RuntimeError):  # a failed copy is reported to the one who waits for it
                    last.wait()  # a copy still reads or fills the victim's slot
            self._free.append(slot)
        slot = self._free.pop()
        self._slot_of[key] = slot
        return slot
