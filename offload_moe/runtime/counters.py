"""One statistics collector for the whole runtime. `patch` makes one and hands it to each component that counts; each
writes only its own fields, all on the compute thread, and `OffloadHandle.stats()` reads them in one place."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields


@dataclass
class Counters:
    """Counters since `patch` (or the last `reset`)."""

    num_layers: int
    # the residency cache
    hits: int = 0  # needed expert already resident (or being copied) when its layer ran
    inflight_hits: int = 0  # ... of which still being copied (by a prefetch): it may still stall
    misses: int = 0  # needed expert neither resident nor in flight
    copies: int = 0  # every copy into a slot after warm-up (demand, prefetch and background)
    bytes_copied: int = 0
    stall_seconds: float = 0.0  # compute thread blocked waiting for copies
    evictions: int = 0
    prefetches: int = 0  # copies started by the lookahead prefetcher
    prefetches_used: int = 0  # ... whose expert was then needed, and had landed (in time)
    background_copies: int = 0  # speculative copies of experts a stand-in or the host served, in idle link time
    background_used: int = 0  # ... whose expert was then needed, and had landed
    speculation_skipped: int = 0  # speculation rounds skipped because the source did not pay at that layer
    lowbit_copies: int = 0  # standin="lowbit": low-bit copies of missed experts fetched for one use
    warmup_copies: int = 0
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)
    # the experts hook
    waves: int = 0  # layer calls that needed more distinct experts than the pool has slots
    substituted: int = 0  # (token, expert) pairs served by a stand-in instead of the real expert
    critical_misses: int = 0  # missed experts kept exact although a stand-in was configured (critical pairs)
    # host compute
    host_jobs: int = 0  # experts computed on the host (one job per expert and layer call)
    host_tokens: int = 0  # (token, expert) pairs they served
    host_seconds: float = 0.0  # worker time of those jobs
    host_wait_seconds: float = 0.0  # compute thread blocked on host results (not hidden by the device's own work)
    # the miss router (fallback="auto")
    auto_host: int = 0  # missed experts the cost model sent to the host ...
    auto_copy: int = 0  # ... and to the link

    def __post_init__(self) -> None:
        self.layer_hits = self.layer_hits or [0] * self.num_layers
        self.layer_misses = self.layer_misses or [0] * self.num_layers

    def reset(self) -> None:
        """Zero every counter, in place (the components keep their reference)."""
        fresh = Counters(self.num_layers)
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    def snapshot(self) -> Counters:
        return copy.deepcopy(self)
