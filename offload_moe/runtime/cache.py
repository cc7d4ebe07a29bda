"""The expert residency cache: one device slot pool shared by all MoE layers, filled from the host store.

A slot holds one (layer, expert) at a time. The pool is one tensor `[slots, ...]` per expert weight, so the stock
transformers experts kernels run on it unchanged once expert ids are remapped to slot ids. The cache is the only
owner of its slots and its transfers. What the experts hook asks of it, once per layer call: `prepare` (count the
routed experts, say which are not ready), `acquire` / `release` around each kernel call on the pool, `speculate` (copy
experts someone may need soon into link time no one waits for), and `fetch_once` (a low-bit copy for one use). All
bookkeeping runs on the caller's (compute) thread; the transfer engine only moves bytes, so no lock is needed.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from offload_moe.runtime.counters import Counters
from offload_moe.runtime.eviction import EvictionPolicy
from offload_moe.runtime.store import HostStore
from offload_moe.runtime.transfer import DEMAND, PREFETCH, Transfer, TransferEngine

Key = tuple[int, int]  # (layer, expert)


class SlotWindow(NamedTuple):
    """Where a layer's experts sit: slots [lo, hi); `table` [E] maps expert id -> slot - lo, or hi - lo (the kernels'
    "skip" id) for experts outside the window."""

    table: torch.Tensor
    lo: int
    hi: int


class Residency(NamedTuple):
    """What `prepare` found for a layer call: the routed experts not ready on the device, and (when some are missing)
    every expert of the layer that is."""

    missing: set[int]
    ready: set[int]


SPECULATION_SOURCES = ("lookahead", "standin", "host")
# Copies of experts computed on the host are judged by admission alone (needed more often than what they evict): by
# landing-before-use they back off at layers with little reuse and leave the cache as a long prefill left it
# (measured, Mixtral-shaped model at 1/2 after a prefill: decode hit rate 0.87 judged, 0.90 admission alone).
ADMISSION_JUDGED = ("host",)
PAY_PRECISION = 0.5  # a source keeps speculating at a layer while at least half its copies there land in time
JUDGE_EVERY = 8  # a source that does not pay at a layer has its suggestions computed and judged at one call in 8


class Payoff:
    """Whether one source's speculative copies pay at one layer: an exponential average of how many had landed when
    their expert was first needed, before the expert they evicted was (a copy evicted unused, still in flight when
    needed, or whose victim was needed first, did not pay: it cost a miss for nothing). It starts at
    the threshold, so a source must pay from its first copies on. While it does not pay, the source's suggestions are
    judged without copying anything (would the copy have landed in time?), so a source that starts to pay again, on a
    faster link or at another phase of the workload, comes back at no cost."""

    def __init__(self) -> None:
        self.precision, self.calls = PAY_PRECISION, 0

    def outcome(self, paid: bool) -> None:
        self.precision = 0.9 * self.precision + 0.1 * float(paid)

    def allows(self) -> bool:
        return self.precision >= PAY_PRECISION

    def wants(self) -> bool:
        """Whether a suggestion is worth computing now: always while the source pays, else one call in JUDGE_EVERY
        (enough to notice when it would pay again, without paying for a prediction at every call)."""
        if self.allows():
            return True
        self.calls += 1
        return self.calls % JUDGE_EVERY == 0


class ExpertCache:
    """`num_slots` device slots for the experts of every layer of `store`, evicted by `eviction`; it counts into
    `counters` (its own fields: hits, misses, copies, stalls, evictions, speculation, warm-up).
    frozen: what `warm` puts in the slots stays there (static placements); nothing is copied afterwards."""

    def __init__(
        self,
        store: HostStore,
        num_slots: int,
        device: torch.device,
        dtype: torch.dtype,
        engine: TransferEngine,
        eviction: EvictionPolicy,
        counters: Counters,
        frozen: bool = False,
    ):
        self.store, self.num_slots, self.device = store, num_slots, torch.device(device)
        self._engine, self._eviction, self.frozen = engine, eviction, frozen
        self.pool = {
            n: torch.empty((num_slots, *shape), dtype=dtype, device=self.device)
            for n, shape in store.expert_shapes.items()
        }  # name -> [S, ...]
        self.slot_bytes = store.expert_bytes(dtype)
        self.all_resident = num_slots == store.num_layers * store.num_experts
        self._slot_of: dict[Key, int] = {}
        self._pending: dict[Key, Transfer] = {}
        self._last_use: list[torch.cuda.Event | None] = [None] * num_slots  # CUDA: last kernel reading the slot
        self._free = list(range(num_slots - 1, -1, -1))
        self._counters = counters
        self._fixed: dict[int, slice] = {}  # layer -> its slots, for layers that never miss (set by warm)
        self._uncounted: list[tuple[int, torch.Tensor]] = []  # eager fixed-layer routing, counted later
        self._traced_hits = torch.zeros(store.num_layers, dtype=torch.long, device=self.device)  # compiled ones
        torch._dynamo.mark_static_address(self._traced_hits)  # a graph may update it in place under CUDA graphs
        self._speculative: dict[Key, str] = {}  # copied speculatively, not yet needed: key -> source
        self._displaced: dict[Key, Key] = {}  # such a copy -> the expert it evicted (if it evicted one)
        self._payoff: dict[tuple[str, int], Payoff] = {}  # (source, layer) -> whether its copies pay there
        self._judged: dict[Key, tuple[str, float]] = {}  # suggested while its source did not pay: -> (source, when)
        self._uses: dict[Key, int] = {}  # layer calls that needed each expert

    # --- queries --------------------------------------------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool.values())

    def _is_ready(self, key: Key) -> bool:
        """Resident and completely copied (never blocks)."""
        if key not in self._slot_of:
            return False
        transfer = self._pending.get(key)
        if transfer is not None and transfer.done():
            self._settle(key)
            return True
        return transfer is None

    def link_use(self) -> dict[str, float]:
        """The link's totals so far (`TransferEngine.link_use`)."""
        return self._engine.link_use()

    def slots(self) -> dict[Key, int]:
        """A copy of the residency map, for inspection."""
        return dict(self._slot_of)

    # --- the hook's operations ------------------------------------------------------------------------------------

    def fetch_once(self, src: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy host tensors into fresh device buffers now, as a demand copy on the link, for one use (a missed
        expert's low-bit copy); counts the copy, its bytes and the wait."""
        dst = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in src]
        transfer = self._engine.submit(src, dst)
        self._counters.stall_seconds += transfer.wait()
        self._counters.lowbit_copies += 1
        self._counters.bytes_copied += transfer.nbytes
        return dst

    def prepare(self, layer: int, experts: list[int]) -> Residency:
        """Layer `layer` now runs and needs `experts`: tell the eviction policy, count hits and misses, and say which
        are not ready on the device (never blocks)."""
        self._eviction.at_layer(layer, self.store.num_layers)
        st = self._counters
        self._judge(layer, experts)
        needed = {(layer, e) for e in experts}
        for copy in [c for c, victim in self._displaced.items() if victim in needed and c not in needed]:
            del self._displaced[copy]  # its victim is needed before it: it cost a miss for nothing
            self._payoff_of(self._speculative.pop(copy), copy[0]).outcome(False)
        for e in experts:
            key = (layer, e)
            self._uses[key] = self._uses.get(key, 0) + 1
            source = self._speculative.pop(key, None)
            self._displaced.pop(key, None)
            if source is not None:  # paid only if it landed in time: one still in flight still stalls or goes to host
                in_time = key not in self._pending or self._pending[key].done()
                self._payoff_of(source, layer).outcome(in_time)
                if in_time and source == "lookahead":
                    st.prefetches_used += 1
                elif in_time:
                    st.background_used += 1
            if key in self._slot_of:
                st.hits += 1
                st.layer_hits[layer] += 1
                if key in self._pending and not self._pending[key].done():
                    st.inflight_hits += 1
            else:
                st.misses += 1
                st.layer_misses[layer] += 1
        missing = {e for e in experts if not self._is_ready((layer, e))}
        if not missing:
            return Residency(missing, set())
        return Residency(missing, {e for (lay, e) in list(self._slot_of) if lay == layer and self._is_ready((lay, e))})

    def acquire(self, layer: int, experts: list[int]) -> SlotWindow:
        """Make `experts` of `layer` resident (fetching misses, waiting for copies). Needs len(experts) <= slots."""
        keys = [(layer, e) for e in experts]
        protected = set(keys)
        for key in keys:
            if key not in self._slot_of:
                while self._load(key, protected) is None:
                    self._wait_for_any_pending(exclude=protected)
            self._eviction.touch(key)
        for key in keys:
            if key in self._pending:
                self._settle(key)
        slots = [self._slot_of[k] for k in keys]
        lo, hi = min(slots), max(slots) + 1
        table = [hi - lo] * self.store.num_experts
        for e, s in zip(experts, slots, strict=True):
            table[e] = s - lo
        return SlotWindow(torch.tensor(table, dtype=torch.long).to(self.device, non_blocking=True), lo, hi)

    def release(self, layer: int, experts: list[int]) -> None:
        """Mark the end of a kernel that read these slots (CUDA: later copies into them wait for it)."""
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        for e in experts:
            self._last_use[self._slot_of[(layer, e)]] = event

    def _load(self, key: Key, protected: set[Key], source: str | None = None) -> Transfer | None:
        """Start copying `key` into a slot unless it is resident or in flight; never evicts `protected` keys.

        source: None for a demand copy (someone waits for it); else the speculation source that asked (no one waits
        yet, so demand copies go first and preempt it). Returns the transfer, or None when `key` is already there or
        no slot can be freed without waiting.
        """
        if key in self._slot_of:
            return None
        if self.frozen:
            raise RuntimeError(f"expert {key} is not resident and this cache is frozen (a static placement): misses "
                               "must be computed on the host; this is a bug in the caller")  # fmt: skip
        victim = None
        if not self._free:
            victim = self._evict(protected)
            if victim is None:
                return None
        transfer = self._start_copy(key, PREFETCH if source is not None else DEMAND)
        self._counters.copies += 1
        self._counters.bytes_copied += transfer.nbytes
        if source is not None:
            self._speculative[key] = source
            if victim is not None and source not in ADMISSION_JUDGED:
                self._displaced[key] = victim
            if source == "lookahead":
                self._counters.prefetches += 1
            else:
                self._counters.background_copies += 1
        return transfer

    def speculate(self, keys: list[Key], protected: set[Key], source: str, max_queued: int = 0) -> bool:
        """Copy `keys` in, in order, behind every demand copy, while at most `max_queued` copies wait for the link;
        resident ones are kept (touched); never evicts `protected` (nor an earlier key of the list).

        source: "lookahead" (the prefetcher's predictions, counted as prefetches), "standin" (experts a stand-in
        served: for the next tokens) or "host" (experts computed on the host: copied only when used more often than
        the expert they would evict, so the cache follows the workload). The last two copy only while the link is
        otherwise idle. A lookahead or stand-in source whose copies at a layer do not pay (land in time, and before
        the expert they evicted is needed) stops copying there and its suggestions are only judged (`Payoff`), so
        speculation that does not pay costs nothing; "host" copies are judged by admission (`ADMISSION_JUDGED`).
        False when it stopped before the end (the link's queue was full, or no slot could be freed); a source that
        does not pay returns True.
        """
        if source not in SPECULATION_SOURCES:
            raise ValueError(f"unknown speculation source {source!r}; one of {SPECULATION_SOURCES}")
        if self.frozen or not keys:
            return True
        if source not in ADMISSION_JUDGED and not self._payoff_of(source, keys[0][0]).allows():
            self._counters.speculation_skipped += 1
            now = time.perf_counter()
            for key in keys:
                if key not in self._slot_of:
                    self._judged.setdefault(key, (source, now))
            return True
        protected = set(protected)
        for key in keys:
            protected.add(key)
            if key in self._slot_of:
                self._eviction.touch(key)
                continue
            if self._engine.queued() > max_queued or (source != "lookahead" and not self._engine.idle()):
                return False
            if source in ADMISSION_JUDGED and not self.admits(key):
                return False
            if self._load(key, protected, source) is None:
                return False  # every slot is protected or in flight
        return True

    def _judge(self, layer: int, experts: list[int]) -> None:
        """Settle the suggestions for `layer` that were only recorded: one whose expert is needed now would have paid
        if a copy started then had landed by now; one that is not needed did not pay."""
        copy_s = self._engine.copy_seconds() or 0.0
        now, needed = time.perf_counter(), set(experts)
        for key in [k for k in self._judged if k[0] == layer]:
            source, when = self._judged.pop(key)
            self._payoff_of(source, layer).outcome(key[1] in needed and now - when >= copy_s)

    def wants_suggestions(self, source: str, layer: int) -> bool:
        """Whether `source` should compute its suggestions for `layer` now (predictions cost compute too)."""
        return not self.frozen and self._payoff_of(source, layer).wants()

    def _payoff_of(self, source: str, layer: int) -> Payoff:
        payoff = self._payoff.get((source, layer))
        if payoff is None:
            payoff = self._payoff[(source, layer)] = Payoff()
        return payoff

    def admits(self, key: Key) -> bool:
        """A copy of `key` (not resident) is worth it: `key` has been needed more often than the expert it would
        evict (or a slot is free)."""
        if self._free:
            return True
        candidates = [k for k in self._slot_of if k not in self._pending]
        victim = self._eviction.victim(candidates)
        return victim is not None and self._uses.get(key, 0) > self._uses.get(victim, 0)

    # --- warm start and the fixed layers ---------------------------------------------------------------------------

    def warm(self, keys: list[Key]) -> None:
        """Fill free slots with `keys` before the first forward (not counted as misses); then find the fixed layers."""
        for key in keys:
            if not self._free:
                break
            self._start_copy(key).wait()
            self._pending.pop(key, None)
            self._counters.warmup_copies += 1
        if self.all_resident or self.frozen:
            self._fixed = self._fixed_layers()

    def _fixed_layers(self) -> dict[int, slice]:
        """Layers whose experts all stay resident with expert e in slot lo + e (every layer when everything fits;
        whole layers of a static placement): their experts module can hold its slots for good."""
        n_exp, out = self.store.num_experts, {}
        for layer in range(self.store.num_layers):
            slots = [self._slot_of.get((layer, e)) for e in range(n_exp)]
            if slots[0] is not None and slots == list(range(slots[0], slots[0] + n_exp)):
                out[layer] = slice(slots[0], slots[0] + n_exp)
        return out

    def fixed_slots(self, layer: int) -> slice | None:
        """The pool slots of a layer that never misses (expert e in its e-th slot), or None."""
        return self._fixed.get(layer)

    def count_fixed(self, layer: int, top_k_index: torch.Tensor) -> None:
        """Count a fixed layer's hits off the decode path, with no host sync: eager, the routing is kept and counted
        later; compiled, it is counted on the device inside the graph (no Python side effect to trace)."""
        if torch.compiler.is_compiling():
            if top_k_index.shape[0] == 1:  # one token: its top-k experts are distinct (a constant in the graph)
                self._traced_hits[layer] += top_k_index.numel()
            else:
                seen = torch.zeros(self.store.num_experts, dtype=torch.long, device=top_k_index.device)
                self._traced_hits[layer] += seen.index_fill_(0, top_k_index.flatten(), 1).sum()
            return
        self._uncounted.append((layer, top_k_index))
        if len(self._uncounted) >= 4096:
            self.flush_counts()

    def flush_counts(self) -> None:
        """Count the fixed layers' routing kept for later (before the counters are read)."""
        for layer, idx in self._uncounted:
            n = int(idx.unique().numel())
            self._counters.hits += n
            self._counters.layer_hits[layer] += n
        self._uncounted.clear()
        traced = self._traced_hits.tolist()
        if any(traced):
            self._counters.hits += sum(traced)
            for layer, n in enumerate(traced):
                self._counters.layer_hits[layer] += n
            self._traced_hits.zero_()

    # --- slots and copies -----------------------------------------------------------------------------------------

    def _start_copy(self, key: Key, priority: int = DEMAND) -> Transfer:
        slot = self._free.pop()
        self._slot_of[key] = slot
        pieces = self.store.expert(*key)
        dst = [self.pool[p.name][slot, p.row : p.row + p.src.shape[0]] for p in pieces]
        src = self.store.copy_sources(*key)
        transfer = self._engine.submit(src, dst, after=self._last_use[slot], priority=priority)
        self.store.copied(*key, transfer)
        self._pending[key] = transfer
        self._eviction.touch(key)
        return transfer

    def _evict(self, protected: set[Key]) -> Key | None:
        """Free the slot of the eviction policy's victim among unprotected, landed keys; returns the victim."""
        for key in [k for k, t in self._pending.items() if t.done()]:  # landed copies are evictable again
            self._settle(key)
        candidates = [k for k in self._slot_of if k not in protected and k not in self._pending]
        victim = self._eviction.victim(candidates)
        if victim is None:
            return None
        self._free.append(self._slot_of.pop(victim))
        source = self._speculative.pop(victim, None)
        self._displaced.pop(victim, None)
        if source is not None:  # copied speculatively and evicted unused: it did not pay
            self._payoff_of(source, victim[0]).outcome(False)
        self._eviction.forget(victim)
        self._counters.evictions += 1
        return victim

    def _settle(self, key: Key) -> None:
        """Wait for `key`'s copy (no time if it landed; raises if it failed), count the stall, forget the transfer."""
        self._counters.stall_seconds += self._pending.pop(key).wait()

    def _wait_for_any_pending(self, exclude: set[Key]) -> None:
        """Block until one in-flight copy (not of `exclude`) lands, so its slot becomes evictable."""
        for key in list(self._pending):
            if key not in exclude:
                self._settle(key)
                return
        raise RuntimeError(
            f"the expert pool has {self.num_slots} slots, all needed at once; this is a bug in the caller "
            "(acquire needs at most num_slots experts)"
        )
