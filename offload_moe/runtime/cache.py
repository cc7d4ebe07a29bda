"""The expert residency cache: one device slot pool shared by all MoE layers, filled from the host store.

The pool is one tensor `[slots, ...]` per expert weight, so the stock transformers experts kernels run on a window
of it unchanged once expert ids are remapped to slot ids. The cache owns the slots (`runtime.slots`: which expert
is where, which to evict), the copies in flight and their victims; it asks `runtime.speculation` whether speculative
copies pay and `runtime.admission` whether a copy is worth its victim. What the experts hook asks of it, per layer
call: `prepare` (count the routed experts, say which are not ready), `fetch` (claim slots for the call's misses and
queue their copies, as one copy), `start` (set the link on the queued copies while the host computes), `stream` (the
call's experts in batches, as they land), `kernel_index` and `kernel_weights` (a kernel pass's slot ids and the
weights they index: the slot table's remap on the pool, or a packed store's decode scratch), `release` (a pass read
these slots), `speculate` (copies into link time no one waits for), and for the host paths `admits` and
`ready_experts`; at attach, `fixed_slots` (a layer that never misses). All bookkeeping runs on the compute thread;
the transfer engine only moves bytes, so no lock is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from offload_moe import compat
from offload_moe.progress import progress
from offload_moe.runtime.admission import UseCounts
from offload_moe.runtime.counters import Counters
from offload_moe.runtime.eviction import EvictionPolicy
from offload_moe.runtime.packed import Unpacker
from offload_moe.runtime.slots import KernelIndex, SlotTable
from offload_moe.runtime.speculation import Source, Speculation
from offload_moe.runtime.store import HostStore
from offload_moe.runtime.transfer import DEMAND, PREFETCH, Transfer, TransferEngine
from offload_moe.runtime.types import ExpertKey

CPU_BOUND = 0.5  # copies whose thread is on a CPU for at least this share of their time compete with the kernels


class Residency(NamedTuple):
    """What `prepare` found for a layer call: routed experts not resident, resident ones whose copy is still in
    flight (both ascending), and the slot of every routed expert (-1: not resident)."""

    missing: list[int]
    inflight: list[int]
    slots: list[int]


class ExpertCache:
    """`num_slots` device slots for the experts of every layer of `store`, evicted by `eviction` within each slot set;
    it counts into `counters` (hits, misses, copies, stalls, evictions, speculation, warm-up). top_k: experts per
    token. frozen: what `warm` puts in the slots stays there (static placements); nothing is copied afterwards.
    admission: count uses for `admits` (the host paths weigh it; a cache that only fetches never asks)."""

    def __init__(
        self,
        store: HostStore,
        num_slots: int,
        device: torch.device,
        dtype: torch.dtype,
        engine: TransferEngine,
        eviction: str | EvictionPolicy | type[EvictionPolicy],
        counters: Counters,
        top_k: int,
        frozen: bool = False,
        admission: bool = True,
    ):
        self.store, self.num_slots, self.device = store, num_slots, torch.device(device)
        self._on_host = self.device.type == "cpu"
        self._engine, self.frozen, self._counters = engine, frozen, counters
        self.pool = {
            n: torch.empty((num_slots, *shape), dtype=dt, device=self.device)
            for n, (shape, dt) in store.pool_parts(dtype).items()
        }  # part name -> [S, ...]
        # a packed store: kernel passes decode the slots they read into a scratch (`kernel_weights`)
        self._unpacker = Unpacker(store.packed, self.device) if store.packed is not None else None
        self.slot_bytes = store.expert_bytes(dtype)
        self.all_resident = num_slots == store.num_layers * store.num_experts
        self.slots = SlotTable(store.num_layers, store.num_experts, num_slots, top_k, eviction, self.device, frozen)
        self.speculation = Speculation(store.num_layers, counters, engine.copy_seconds)
        self.uses = UseCounts(store.num_layers, store.num_experts) if admission else None
        self._pending: dict[ExpertKey, tuple[Transfer, int]] = {}  # copies in flight (and part), by expert
        self._last_use: list[torch.cuda.Event | None] = [None] * num_slots  # CUDA: last kernel reading the slot
        self._views: list[list[torch.Tensor] | None] = [None] * num_slots  # per slot: where a copy's pieces go
        self._fixed: dict[int, slice] = {}  # layer -> its slots, for layers that never miss (set by warm)

    # --- queries --------------------------------------------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool.values())

    def link_use(self) -> dict[str, float]:
        """The link's totals so far (`TransferEngine.link_use`)."""
        return self._engine.link_use()

    def resident(self) -> dict[ExpertKey, int]:
        """A copy of the residency map (resident and in-flight experts and their slots), for inspection."""
        return self.slots.keys()

    def ready_experts(self, layer: int) -> set[int]:
        """Every expert of `layer` on the device and completely copied."""
        resident = [(layer, e) for e in np.flatnonzero(self.slots.row(layer) >= 0).tolist()]
        return {k[1] for k in resident if not self._in_flight(k) and self.slots.slot(k) >= 0}

    def fixed_slots(self, layer: int) -> slice | None:
        """The pool slots of a layer that never misses (expert e in its e-th slot), or None."""
        return self._fixed.get(layer)

    def _in_flight(self, key: ExpertKey) -> bool:
        """A copy of `key` is still on its way. One that landed is settled now; a speculative one that failed (no one
        waits for it) gives its slot back, leaving `key` absent."""
        got = self._pending.get(key)
        if got is None:
            return False
        if not got[0].done(got[1]):
            return True
        if got[0].failed(got[1]):
            del self._pending[key]
            self.slots.free(key[0], self.slots.remove(key))
            return False
        self._settle(key)
        return False

    def _busy(self, key: ExpertKey) -> bool:
        """A copy into `key`'s slot is running (its slot cannot be reused yet); never changes anything."""
        got = self._pending.get(key)
        return got is not None and not got[0].done(got[1])

    # --- the hook's operations, once per layer call ---------------------------------------------------------------

    def prepare(self, layer: int, experts: list[int]) -> Residency:
        """Layer `layer` now runs and needs `experts` (distinct, ascending): count hits and misses, settle what
        speculation and admission learn from it, and say which experts are not ready (never blocks)."""
        table = self.slots
        table.at_layer(layer)
        keys = [(layer, e) for e in experts]
        inflight = [k[1] for k in keys if k in self._pending and self._in_flight(k)] if self._pending else []
        slots = table.slots_of(layer, experts)
        missing = [e for e, s in zip(experts, slots, strict=True) if s < 0]
        self.speculation.needed(layer, keys, lambda k: k not in self._pending and table.slot(k) >= 0)
        if self.uses is not None:
            self.uses.used(layer, experts)
        st = self._counters
        hits = len(keys) - len(missing)
        st.hits += hits
        st.layer_hits[layer] += hits
        st.misses += len(missing)
        st.layer_misses[layer] += len(missing)
        st.inflight_hits += len(inflight)
        table.touch_all(layer, [k for k, s in zip(keys, slots, strict=True) if s >= 0] if missing else keys)
        return Residency(missing, inflight, slots)

    def fetch(self, layer: int, experts: list[int], protected: set[ExpertKey]) -> list[int]:
        """Queue demand copies of `experts` of `layer`, as one copy in order, for as many as slots of its set can be
        freed without waiting (never evicting `protected`); returns the experts whose copies are queued. The link
        starts on them when the caller waits for one (moving it on its own thread) or calls `start`."""
        if not experts:
            return []
        slots = self._claim(layer, len(experts), protected)
        if slots:
            self._copy([(layer, e) for e in experts[: len(slots)]], slots, DEMAND, wake=False)
        return experts[: len(slots)]

    def start(self) -> None:
        """Start the link on the queued copies (the caller computes meanwhile)."""
        self._engine.wake()

    def stream(
        self,
        layer: int,
        pool: list[int],
        waiting: list[int],
        queued: list[int],
        protected: set[ExpertKey],
        pass_seconds: float,
    ) -> Iterator[list[int]]:
        """`pool`'s experts (resident or on their way) in batches, each ready to compute when yielded: the ready ones
        first, then the copies as they land. waiting: the pool's experts whose copies are in flight; queued: those
        not copied yet (no slot was free: computed experts make room, so the caller must be done with a batch when
        it asks for the next, its slots leaving `protected`). Copies expected to land before another kernel pass
        would take (`pass_seconds`) are waited for instead, so one pass does it all; so are copies that keep a CPU
        busy when the device is the host's CPU (`_copies_take_the_cores`)."""
        if waiting and not queued and (self._copies_take_the_cores() or pass_seconds > self._landing_seconds()):
            for e in reversed(waiting):  # sooner than a pass: moved on this thread (the last first: all at once)
                self.wait(layer, e)
            waiting = []
        if waiting or queued:
            self.start()  # the link moves the rest while the ready experts compute
        later = set(waiting).union(queued)
        batch = [e for e in pool if e not in later] + self.landed(layer, waiting)
        while True:
            if batch:
                yield batch
                protected.difference_update((layer, e) for e in batch)
                done = set(batch)
                waiting = [e for e in waiting if e not in done]
            if queued:
                more = self.fetch(layer, queued, protected)
                queued = queued[len(more) :]
                waiting += more
            if not waiting:
                if not queued:
                    return
                self._make_room(layer, protected)  # every other slot of the set is being filled: wait for one
                batch = []
                continue
            batch = self.landed(layer, waiting)
            if not batch:
                self.wait(layer, waiting[0])
                batch = [waiting[0], *self.landed(layer, waiting[1:])]

    def landed(self, layer: int, experts: list[int]) -> list[int]:
        """Which of these experts (resident) are completely copied now (never blocks; raises if a copy failed)."""
        out, pending = [], self._pending
        for e in experts:
            got = pending.get((layer, e))
            if got is not None:
                if not got[0].done(got[1]):
                    continue
                self._settle((layer, e))
            out.append(e)
        return out

    def _make_room(self, layer: int, protected: set[ExpertKey]) -> None:
        """Block until a copy into `layer`'s set lands (not one of `protected`), so its slot becomes evictable."""
        lo, hi = self.slots.set_range(layer)
        for key in list(self._pending):
            if key not in protected and lo <= self.slots.slot(key) < hi:
                self._settle(key)
                return
        raise RuntimeError(
            f"MoE layer {layer}: its slot set holds {hi - lo} experts, all needed by this call at once; this is a bug "
            "(a call computes what it can and frees those slots first)"
        )

    def _copies_take_the_cores(self) -> bool:
        """The device is the host's CPU and the copies keep a CPU busy (a memcpy, a read from the page cache): a copy
        beside a kernel pass then takes a core the pass's threads wait for, so both run slower than in turn, and the
        call pays a second pass. A copy that mostly waits (for a disk, or an emulated link) still overlaps."""
        return self._on_host and self._engine.cpu_share() >= CPU_BOUND

    def _landing_seconds(self) -> float:
        """Estimated time until every demand copy started so far has landed (the link's own measurements)."""
        return self._engine.demand_wait_seconds() + (self._engine.copy_seconds() or 0.0)

    def wait(self, layer: int, expert: int) -> None:
        """Block until `expert`'s copy has landed (counts the stall; raises if the copy failed)."""
        if (layer, expert) in self._pending:
            self._settle((layer, expert))

    def kernel_index(
        self, layer: int, ids: np.ndarray, top_k_index: torch.Tensor, experts: list[int], every: bool = False
    ) -> KernelIndex:
        """The slot ids of one kernel pass over `experts` (resident, landed) of `layer`; ids: the call's [T, K]
        routing on the host, top_k_index the same on the device. every: `experts` are all the routed experts (no
        pair is skipped; the device remaps without a host round trip). A packed store's pass reads its experts
        decoded into rows 0..n-1 of the scratch (`kernel_weights`)."""
        if self._unpacker is None:
            return self.slots.remap(layer, ids, top_k_index, experts, every)
        self._unpacker.decode(self.pool, self.slots.slots_of(layer, experts))
        window = len(experts) if every else max(len(experts), compat.MASKED_WINDOW)
        local = Unpacker.remap(ids, experts, self.store.num_experts, window)
        return KernelIndex(torch.from_numpy(local).to(self.device, non_blocking=True), 0, window, not every)

    def kernel_weights(self) -> dict[str, torch.Tensor]:
        """What a `KernelIndex`'s [lo, hi) indexes: the slot pool, or a packed store's decode scratch."""
        return self.pool if self._unpacker is None else self._unpacker.scratch

    def release(self, layer: int, experts: list[int]) -> None:
        """Mark the end of a kernel pass that read these slots (CUDA: later copies into them wait for it)."""
        if self._on_host:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        for e in experts:
            self._last_use[self.slots.slot((layer, e))] = event

    def speculate(self, keys: list[ExpertKey], protected: set[ExpertKey], source: Source, max_queued: int = 0) -> bool:
        """Copy `keys` in, in order, behind every demand copy, while at most `max_queued` other speculative copies wait
        for the link;
        resident ones are kept (touched); never evicts `protected` (nor an earlier key of the list). STANDIN and
        HOST copies go only into idle link time; HOST copies only when admitted, and never where the copies take the
        cores (`_copies_take_the_cores`: there the host job already ran on the device's own cores from the same
        memory, so a copy costs compute and buys none). A source that does not pay at the keys' layer copies nothing
        and has its suggestions judged (`Speculation`). False when it stopped before the end (the link's queue was
        full, no slot could be freed, or a key was not admitted)."""
        if self.frozen or not keys or source is Source.HOST and self._copies_take_the_cores():
            return True
        if not self.speculation.allows(source, keys[0][0]):
            self.speculation.judge_later(source, [k for k in keys if self.slots.slot(k) < 0])
            return True
        protected = set(protected)
        for key in keys:
            protected.add(key)
            if self.slots.slot(key) >= 0:
                self.slots.touch(key)
                continue
            if self._engine.queued(PREFETCH) > max_queued or (
                source is not Source.LOOKAHEAD and not self._engine.idle()
            ):
                return False
            if source is Source.HOST and not self.admits(key):
                return False
            if not self._load(key, protected, source):
                return False  # every slot of the set is protected or in flight
        return True

    def wants_suggestions(self, source: Source, layer: int) -> bool:
        """Whether `source` should compute its suggestions for `layer` now (predictions cost compute too)."""
        return not self.frozen and self.speculation.wants(source, layer)

    def admits(self, key: ExpertKey) -> bool:
        """A copy of `key` (absent) is worth it: a slot of its set is free, or `key` has been needed more often than
        the expert it would evict."""
        layer = key[0]
        if self.slots.has_free(layer):
            return True
        victim = self.slots.victim(layer, self._busy)
        return victim is not None and (self.uses is None or self.uses.admits(key, victim))

    # --- warm start and the fixed layers ---------------------------------------------------------------------------

    def warm(self, keys: list[ExpertKey]) -> None:
        """Fill the slots with the first of `keys` that fit their sets before the first forward (not counted as
        misses), laid out layer by layer so a layer's experts sit in consecutive slots; then find the fixed layers."""
        chosen = sorted(self.slots.fitting(keys))
        if chosen:
            self._copy(chosen, [self.slots.take_free(k[0])[0] for k in chosen], DEMAND, warm=True)
            for key in progress(chosen, "offload_moe: filling the expert cache", unit="expert"):
                transfer, part = self._pending.pop(key)
                transfer.wait(part)
            self._counters.warmup_copies += len(chosen)
        if self.all_resident or self.frozen:
            self._fixed = self._fixed_layers()

    def _fixed_layers(self) -> dict[int, slice]:
        """Layers whose experts all stay resident with expert e in slot lo + e (every layer when everything fits;
        whole layers of a static placement): their experts module can hold its slots for good. None of a packed
        store: its slots must be decoded before a kernel reads them."""
        out: dict[int, slice] = {}
        if self._unpacker is not None:
            return out
        for layer in range(self.store.num_layers):
            row = self.slots.row(layer)
            if row[0] >= 0 and np.array_equal(row, np.arange(row[0], row[0] + len(row))):
                out[layer] = slice(int(row[0]), int(row[0]) + len(row))
        return out

    # --- slots and copies -----------------------------------------------------------------------------------------

    def _load(self, key: ExpertKey, protected: set[ExpertKey], source: Source) -> bool:
        """Start a speculative copy of `key` (absent) into a slot of its set (no one waits yet, so demand copies go
        first and preempt it), evicting the policy's victim (never a `protected` key or one being copied) when none
        is free. False when no slot can be freed without waiting."""
        victims: list[ExpertKey] = []
        slots = self._claim(key[0], 1, protected, victims)
        if not slots:
            return False
        self._copy([key], slots, PREFETCH)
        self.speculation.copied(key, source, victims[0] if victims else None)
        return True

    def _claim(
        self, layer: int, n: int, protected: set[ExpertKey], victims: list[ExpertKey] | None = None
    ) -> list[int]:
        """Up to `n` slots of `layer`'s set for new experts: free ones, then the policy's victims' (never a
        `protected` key or one being copied), evicted now (appended to `victims`). Fewer when no more can be freed
        without waiting."""
        if self.frozen:
            raise RuntimeError(
                f"MoE layer {layer} misses an expert and this cache is frozen (a static placement): misses must be "
                "computed on the host; this is a bug in the caller"
            )
        pending, st = self._pending, self._counters
        slots, out = self.slots.claim(layer, n, lambda k: k in protected or self._busy(k))
        for victim in out:
            landed = pending.pop(victim, None)  # a copy that landed (or failed) and was never settled
            if landed is not None and not landed[0].failed(landed[1]):
                st.stall_seconds += landed[0].wait(landed[1])
            self.speculation.evicted(victim)
        st.evictions += len(out)
        if victims is not None:
            victims += out
        return slots

    def _copy(
        self, keys: list[ExpertKey], slots: list[int], priority: int, wake: bool = True, warm: bool = False
    ) -> None:
        """Put `keys` in `slots` and queue their copies there (counted unless they are the warm start's)."""
        table, last_use = self.slots, self._last_use
        for key, slot in zip(keys, slots, strict=True):
            table.put(key, slot)
        after = [] if self._on_host else [e for s in slots if (e := last_use[s]) is not None]
        copies = self.store.copy_to(keys, [self._slot_views(s) for s in slots], self._engine, after, priority, wake)
        if not warm:
            self._counters.copies += len(keys)
            self._counters.bytes_copied += len(keys) * self.slot_bytes
        self._pending.update(zip(keys, copies, strict=True))

    def _slot_views(self, slot: int) -> list[torch.Tensor]:
        """Where an expert's pieces go in `slot` (views of the pool, made once per slot)."""
        views = self._views[slot]
        if views is None:
            views = self._views[slot] = [self.pool[n][slot, lo:hi] for n, lo, hi in self.store.layout]
        return views

    def _settle(self, key: ExpertKey) -> None:
        """Wait for `key`'s copy (no time if it landed) and count the stall. A failed copy gives its slot back, so
        nothing is ever computed from it, and raises."""
        transfer, part = self._pending.pop(key)
        try:
            self._counters.stall_seconds += transfer.wait(part)
        except RuntimeError as e:
            self.slots.free(key[0], self.slots.remove(key))
            raise RuntimeError(
                f"copying expert {key[1]} of MoE layer {key[0]} to {self.device} failed ({e.__cause__ or e}); "
                "its slot is free again and nothing was computed from it"
            ) from e
