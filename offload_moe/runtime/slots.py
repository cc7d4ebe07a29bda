"""Which expert sits in which device slot: a host table [layers, experts] -> slot with its device mirror, the slot
sets, the choice of a victim, and the remap of a kernel pass's expert ids to slot ids.

The pool's slots are split into sets of consecutive slots. Each set serves a run of consecutive MoE layers and has
room for at least max(experts per layer, `SET_SLOTS`) experts; a layer's experts live only in its set (a
set-associative cache). The stock experts kernel runs over a window of slots, and some kernels spend time on every
slot of the window even when no token is routed to it (grouped_mm on a CPU loops over every group), so a window
bounded by one set keeps a layer call's cost independent of the pool's size. Each set has its own eviction policy.
When a set holds less than one token's working set (its layers' top-k experts each), a layer keeps one expert of its
own against the other layers, as far as the set can still give every layer room for its top-k: plain LRU there
evicts every layer's experts just before that layer runs again, and hits nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch

from offload_moe import compat
from offload_moe.runtime.eviction import EVICTION_POLICIES, EvictionPolicy
from offload_moe.runtime.types import ExpertKey

SET_SLOTS = 8  # a set has at least this many slots (or all of them): small pools stay one fully associative set


class KernelIndex(NamedTuple):
    """One kernel pass over slots [lo, hi): `index` [T, K] the routed pairs' slot ids relative to lo, hi - lo (the
    kernels' "skip" id) for pairs outside the pass; `masked`: some pairs are skipped."""

    index: torch.Tensor
    lo: int
    hi: int
    masked: bool


class SlotSet:
    """Slots [lo, hi) serving MoE layers `layers`: their free slots and their eviction order."""

    def __init__(self, lo: int, hi: int, layers: range, policy: EvictionPolicy):
        self.lo, self.hi, self.layers, self.policy = lo, hi, layers, policy
        self.free = list(range(hi - 1, lo - 1, -1))


def make_policy(eviction: str | EvictionPolicy | type[EvictionPolicy]) -> Callable[[], EvictionPolicy]:
    """A factory of per-set policies from an option value: a name, a policy class, or an instance (copied per set)."""
    if isinstance(eviction, EvictionPolicy):
        return lambda: copy.deepcopy(eviction)
    if isinstance(eviction, type) and issubclass(eviction, EvictionPolicy):
        return eviction
    if eviction not in EVICTION_POLICIES:
        raise ValueError(f"unknown eviction policy {eviction!r}; choose one of {sorted(EVICTION_POLICIES)}")
    return EVICTION_POLICIES[eviction]


class SlotTable:
    """The residency map of `num_slots` slots for `num_layers` x `num_experts` experts.

    top_k: experts per token (a call's misses need that much room beside the layers' own floor). one_set: a single
    set over every slot (static placements, which never evict, lay each layer's experts out consecutively instead).
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        num_slots: int,
        top_k: int,
        eviction: str | EvictionPolicy | type[EvictionPolicy],
        device: torch.device,
        one_set: bool = False,
    ):
        if num_slots < 1:
            raise ValueError("a slot table needs at least one slot")
        self.num_layers, self.num_experts, self.num_slots = num_layers, num_experts, num_slots
        policy = make_policy(eviction)
        n_sets = 1 if one_set else max(1, min(num_layers, num_slots // max(num_experts, SET_SLOTS)))
        self.set_of = [layer * n_sets // num_layers for layer in range(num_layers)]  # layer -> its set
        self.sets: list[SlotSet] = []
        lo = 0
        for i in range(n_sets):
            layers = range(self.set_of.index(i), num_layers - self.set_of[::-1].index(i))
            hi = num_slots * layers.stop // num_layers  # slots in proportion to layers: no set starves
            self.sets.append(SlotSet(lo, hi, layers, policy()))
            lo = hi
        self.floor = [0] * num_layers  # a layer keeps this many of its own experts against other layers
        for s in self.sets:  # below one token's working set: as many layers as leave every layer room for top_k
            cap, n = s.hi - s.lo, len(s.layers)
            if cap >= n * top_k:
                continue
            for layer in list(s.layers)[: n if n <= cap - top_k + 1 else max(0, cap - top_k)]:
                self.floor[layer] = 1
        self.count = [0] * num_layers  # resident experts per layer
        self.host = np.full((num_layers, num_experts), -1, dtype=np.int64)  # (layer, expert) -> slot, -1: absent
        self._lists = [[-1] * num_experts for _ in range(num_layers)]  # the same as Python ints: a call reads a few
        self.key_of: list[ExpertKey | None] = [None] * num_slots
        self.device = torch.device(device)
        self._on_host = self.device.type == "cpu"  # read per change and per pass: `device.type` costs a lookup
        # the device mirror: on a CPU device the same memory; on CUDA a copy, its rows refreshed before use
        self._mirror = torch.from_numpy(self.host) if self._on_host else self._upload()
        self._stale: set[int] = set()
        self.victim_steps = 0  # keys examined by `victim`, for the record: O(1) per eviction

    def _upload(self) -> torch.Tensor:
        return torch.from_numpy(self.host).to(self.device)

    # --- queries ------------------------------------------------------------------------------------------------

    def slot(self, key: ExpertKey) -> int:
        """The slot of `key`, or -1."""
        return self._lists[key[0]][key[1]]

    def slots_of(self, layer: int, experts: list[int]) -> list[int]:
        """The slot of each of `experts` of `layer` (-1: absent)."""
        row = self._lists[layer]
        return [row[e] for e in experts]

    def row(self, layer: int) -> np.ndarray:
        """[E] slot of each expert of `layer` (-1: absent), on the host."""
        return self.host[layer]

    def device_row(self, layer: int) -> torch.Tensor:
        """[E] the same on the device (the kernel's slot remap gathers from it without a host round trip)."""
        if layer in self._stale:
            self._mirror[layer].copy_(torch.from_numpy(self.host[layer]), non_blocking=True)
            self._stale.discard(layer)
        return self._mirror[layer]

    def remap(
        self, layer: int, ids: np.ndarray, top_k_index: torch.Tensor, experts: list[int], every: bool
    ) -> KernelIndex:
        """The slot ids of one kernel pass over `experts` (resident) of `layer`: ids the call's [T, K] routing on the
        host, top_k_index the same on the device. every: `experts` are all the routed experts, so no pair is skipped
        and the device remaps from its mirror without a host round trip. Otherwise the window [lo, hi) is widened to
        the kernels' minimum where the pool allows, and skipped pairs get hi - lo."""
        row = self.host[layer]
        slots = self.slots_of(layer, experts)
        lo, hi = min(slots), max(slots) + 1
        if every:
            if self._on_host:  # the table is the device's own memory: remap in place of a gather
                return KernelIndex(torch.from_numpy(row[ids] - lo), lo, hi, False)
            return KernelIndex(self.device_row(layer)[top_k_index] - lo, lo, hi, False)
        if hi - lo < compat.MASKED_WINDOW and self.num_slots >= compat.MASKED_WINDOW:
            hi, lo = (hi + 1, lo) if hi < self.num_slots else (hi, lo - 1)
        local = np.full(len(row), hi - lo, dtype=row.dtype)  # [E]: a skipped expert points past the window
        local[experts] = row[experts] - lo
        local = local[ids]  # [T, K]
        return KernelIndex(torch.from_numpy(local).to(self.device, non_blocking=True), lo, hi, True)

    def set_range(self, layer: int) -> tuple[int, int]:
        s = self.sets[self.set_of[layer]]
        return s.lo, s.hi

    def keys(self) -> dict[ExpertKey, int]:
        """Every resident key and its slot."""
        return {k: s for s, k in enumerate(self.key_of) if k is not None}

    # --- changes --------------------------------------------------------------------------------------------------

    def at_layer(self, layer: int) -> None:
        self.sets[self.set_of[layer]].policy.at_layer(layer, self.num_layers)

    def touch(self, key: ExpertKey) -> None:
        self.sets[self.set_of[key[0]]].policy.touch(key)

    def touch_all(self, layer: int, keys: Iterable[ExpertKey]) -> None:
        """`keys` of `layer` are used now."""
        touch = self.sets[self.set_of[layer]].policy.touch
        for key in keys:
            touch(key)

    def has_free(self, layer: int) -> bool:
        """`layer`'s set has a free slot."""
        return bool(self.sets[self.set_of[layer]].free)

    def take_free(self, layer: int, n: int = 1) -> list[int]:
        """Up to `n` free slots of `layer`'s set (fewer when it has fewer), lowest first."""
        free = self.sets[self.set_of[layer]].free
        taken = free[len(free) - n :] if n < len(free) else free[:]
        del free[len(free) - len(taken) :]
        return taken[::-1]

    def fitting(self, keys: list[ExpertKey]) -> list[ExpertKey]:
        """The first of `keys` that fit their sets' free slots, in order."""
        room = [len(s.free) for s in self.sets]
        out = []
        for key in keys:
            i = self.set_of[key[0]]
            if room[i]:
                room[i] -= 1
                out.append(key)
        return out

    def put(self, key: ExpertKey, slot: int) -> None:
        """`key` now occupies `slot` (free, taken from its set)."""
        self.host[key] = self._lists[key[0]][key[1]] = slot
        self.key_of[slot] = key
        self.count[key[0]] += 1
        self.touch(key)
        self._changed(key[0])

    def remove(self, key: ExpertKey) -> int:
        """`key` leaves its slot; returns the slot (the caller reuses it or gives it back with `free`)."""
        slot = self._lists[key[0]][key[1]]
        self.host[key] = self._lists[key[0]][key[1]] = -1
        self.key_of[slot] = None
        self.count[key[0]] -= 1
        self.sets[self.set_of[key[0]]].policy.forget(key)
        self._changed(key[0])
        return slot

    def free(self, layer: int, slot: int) -> None:
        """Give `slot` (of `layer`'s set, emptied by `remove`) back to the set's free slots."""
        self.sets[self.set_of[layer]].free.append(slot)

    def claim(self, layer: int, n: int, skip: Callable[[ExpertKey], bool]) -> tuple[list[int], list[ExpertKey]]:
        """Up to `n` slots of `layer`'s set for new experts: its free slots, then those of the policy's victims that
        `skip` allows (see `victims`), removed now. Returns the slots and the evicted keys; fewer slots when no more
        can be freed."""
        slots = self.take_free(layer, n)
        evicted = self.victims(layer, n - len(slots), skip) if len(slots) < n else []
        slots += [self.remove(key) for key in evicted]
        return slots, evicted

    def victim(self, layer: int, skip: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """The expert `layer`'s set should give up for `layer` (see `victims`), or None."""
        out = self.victims(layer, 1, skip)
        return out[0] if out else None

    def victims(self, layer: int, n: int, skip: Callable[[ExpertKey], bool]) -> list[ExpertKey]:
        """Up to `n` experts `layer`'s set should give up for `layer`: the first of its policy's order that `skip`
        allows, never leaving another layer below the floor (changes nothing: the caller removes them)."""
        out: list[ExpertKey] = []
        taken: dict[int, int] = {}
        count, floor = self.count, self.floor
        for key in self.sets[self.set_of[layer]].policy.victims():
            self.victim_steps += 1
            other = key[0]
            if other != layer and count[other] - taken.get(other, 0) <= floor[other]:
                continue
            if not skip(key):
                out.append(key)
                taken[other] = taken.get(other, 0) + 1
                if len(out) == n:
                    break
        return out

    def _changed(self, layer: int) -> None:
        if not self._on_host:
            self._stale.add(layer)
