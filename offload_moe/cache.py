"""The expert residency cache: one device slot pool shared by all MoE layers, filled from the host store.

A slot holds one (layer, expert) at a time. The pool is one tensor `[slots, ...]` per expert weight, so the stock
transformers experts kernels run on it unchanged once expert ids are remapped to slot ids. All bookkeeping runs on
the caller's (compute) thread; the transfer engine only moves bytes, so no lock is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .eviction import EvictionPolicy
from .store import HostStore
from .transfer import DEMAND, PREFETCH, Transfer, TransferEngine

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    num_layers: int
    hits: int = 0  # needed expert already resident
    inflight_hits: int = 0  # needed expert already being copied (by a prefetch): it may still stall
    misses: int = 0  # needed expert neither resident nor in flight: copied on demand
    copies: int = 0  # every copy into a slot after warm-up (misses + prefetches)
    bytes_copied: int = 0
    stall_seconds: float = 0.0  # compute thread blocked waiting for copies
    evictions: int = 0
    waves: int = 0  # layer calls that needed more distinct experts than the pool has slots
    prefetches: int = 0  # copies started by the lookahead prefetcher
    prefetches_used: int = 0  # ... whose expert was then needed before being evicted
    substituted: int = 0  # (token, expert) pairs served by a fallback instead of the real expert
    gated_fetches: int = 0  # missing experts fetched anyway because a token needed them critically
    warmup_copies: int = 0
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layer_hits = [0] * self.num_layers
        self.layer_misses = [0] * self.num_layers


class ExpertCache:
    """`num_slots` device slots for the experts of every layer of `store`, evicted by `eviction`."""

    def __init__(
        self,
        store: HostStore,
        num_slots: int,
        device: torch.device,
        dtype: torch.dtype,
        engine: TransferEngine,
        eviction: EvictionPolicy,
    ):
        self.store, self.num_slots, self.device = store, num_slots, torch.device(device)
        self.engine, self.eviction = engine, eviction
        self.pool = {
            n: torch.empty((num_slots, *shape), dtype=dtype, device=self.device)
            for n, shape in store.expert_shapes.items()
        }  # name -> [S, ...]
        self.slot_bytes = store.expert_bytes(dtype)
        self.slot_key: list[Key | None] = [None] * num_slots
        self.slot_of: dict[Key, int] = {}
        self.pending: dict[Key, Transfer] = {}
        self.last_use: list[torch.cuda.Event | None] = [None] * num_slots  # CUDA: last kernel reading the slot
        self._free = list(range(num_slots - 1, -1, -1))
        self.stats = CacheStats(store.num_layers)
        self.all_resident = num_slots == store.num_layers * store.num_experts
        self._static: list[tuple[torch.Tensor, int, int]] = []
        self._uncounted: list[tuple[int, torch.Tensor]] = []
        self._prefetched: set[Key] = set()  # prefetched, not yet needed

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool.values())

    def warm(self, keys: list[Key]) -> None:
        """Fill free slots with `keys` before the first forward (not counted as misses)."""
        for key in keys:
            if not self._free:
                break
            self._load(key).wait()
            self.pending.pop(key, None)
            self.stats.warmup_copies += 1
        if self.all_resident:
            self._static = [self.acquire(layer, list(range(self.store.num_experts)))
                            for layer in range(self.store.num_layers)]  # fmt: skip

    def load(self, key: Key, protected: set[Key], prefetch: bool = False, speculative: bool = False) -> Transfer | None:
        """Start copying `key` into a slot unless it is resident or in flight; never evicts `protected` keys.

        prefetch: started by the lookahead prefetcher (counted as such); prefetch or speculative: no one waits for it
        yet, so demand copies go first. Returns the transfer, or None when `key` is already there or no slot can be
        freed without waiting.
        """
        if key in self.slot_of:
            return None
        if not self._free and self._evict(protected) is None:
            return None
        transfer = self._load(key, PREFETCH if prefetch or speculative else DEMAND)
        self.stats.copies += 1
        self.stats.bytes_copied += transfer.nbytes
        if prefetch:
            self.stats.prefetches += 1
            self._prefetched.add(key)
        return transfer

    def is_ready(self, key: Key) -> bool:
        """Resident and completely copied (never blocks)."""
        if key not in self.slot_of:
            return False
        transfer = self.pending.get(key)
        if transfer is not None and transfer.done():
            self._settle(key)
            return True
        return transfer is None

    def ready_experts(self, layer: int) -> set[int]:
        """Experts of `layer` that are resident and completely copied."""
        return {e for (lay, e) in list(self.slot_of) if lay == layer and self.is_ready((lay, e))}

    def count(self, layer: int, experts: list[int]) -> None:
        """Count a layer call's needs: resident (hit), being copied (hit, in flight) or absent (miss)."""
        st = self.stats
        for e in experts:
            key = (layer, e)
            if key in self._prefetched:
                self._prefetched.discard(key)
                st.prefetches_used += 1
            if key in self.slot_of:
                st.hits += 1
                st.layer_hits[layer] += 1
                if key in self.pending and not self.pending[key].done():
                    st.inflight_hits += 1
            else:
                st.misses += 1
                st.layer_misses[layer] += 1

    def count_later(self, layer: int, top_k_index: torch.Tensor) -> None:
        """All-resident mode: keep the routing to count hits later, off the decode path."""
        self._uncounted.append((layer, top_k_index))
        if len(self._uncounted) >= 4096:
            self.flush_counts()

    def flush_counts(self) -> None:
        for layer, idx in self._uncounted:
            n = int(idx.unique().numel())
            self.stats.hits += n
            self.stats.layer_hits[layer] += n
        self._uncounted.clear()

    def static_table(self, layer: int) -> tuple[torch.Tensor, int, int]:
        """All-resident mode: the fixed (table, lo, hi) of a layer whose experts sit in consecutive slots."""
        return self._static[layer]

    def acquire(self, layer: int, experts: list[int]) -> tuple[torch.Tensor, int, int]:
        """Make `experts` of `layer` resident (fetching misses, waiting for copies); returns (table, lo, hi).

        They occupy slots within [lo, hi); `table` is a device LongTensor [E] mapping each expert of the layer to
        its slot minus lo, or to hi - lo (the kernels' "skip" sentinel) for experts not in `experts`.
        Needs len(experts) <= num_slots.
        """
        keys = [(layer, e) for e in experts]
        protected = set(keys)
        for key in keys:
            if key not in self.slot_of:
                while self.load(key, protected) is None:
                    self._wait_for_any_pending(exclude=protected)
            self.eviction.touch(key)
        for key in keys:
            if key in self.pending:
                self._settle(key)
        slots = [self.slot_of[k] for k in keys]
        lo, hi = min(slots), max(slots) + 1
        table = [hi - lo] * self.store.num_experts
        for e, s in zip(experts, slots, strict=True):
            table[e] = s - lo
        return torch.tensor(table, dtype=torch.long).to(self.device, non_blocking=True), lo, hi

    def release(self, layer: int, experts: list[int]) -> None:
        """Mark the end of a kernel that read these slots (CUDA: later copies into them wait for it)."""
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        for e in experts:
            self.last_use[self.slot_of[(layer, e)]] = event

    def _load(self, key: Key, priority: int = DEMAND) -> Transfer:
        slot = self._free.pop()
        self.slot_key[slot] = key
        self.slot_of[key] = slot
        pieces = self.store.expert(*key)
        dst = [self.pool[p.name][slot, p.row : p.row + p.src.shape[0]] for p in pieces]
        transfer = self.engine.submit([p.src for p in pieces], dst, after=self.last_use[slot], priority=priority)
        self.pending[key] = transfer
        self.eviction.touch(key)
        return transfer

    def _evict(self, protected: set[Key]) -> int | None:
        for key in [k for k, t in self.pending.items() if t.done()]:  # landed copies are evictable again
            self._settle(key)
        candidates = [k for k in self.slot_of if k not in protected and k not in self.pending]
        victim = self.eviction.victim(candidates)
        if victim is None:
            return None
        slot = self.slot_of.pop(victim)
        self._prefetched.discard(victim)
        self.slot_key[slot] = None
        self.eviction.forget(victim)
        self._free.append(slot)
        self.stats.evictions += 1
        return slot

    def _settle(self, key: Key) -> None:
        """Wait for `key`'s copy (no time if it landed; raises if it failed), count the stall, forget the transfer."""
        self.stats.stall_seconds += self.pending.pop(key).wait()

    def _wait_for_any_pending(self, exclude: set[Key]) -> None:
        """Block until one in-flight copy (not of `exclude`) lands, so its slot becomes evictable."""
        for key in list(self.pending):
            if key not in exclude:
                self._settle(key)
                return
        raise RuntimeError(
            f"the expert pool has {self.num_slots} slots, all needed at once; this is a bug in the caller "
            "(acquire needs at most num_slots experts)"
        )
