"""One statistics collector for the whole runtime. `patch` makes one and hands it to each component that counts; each
writes only its own fields, all on the compute thread, and `OffloadHandle.stats()` reads them in one place.
`FixedHits` counts the layers that never miss off the decode path and adds them in when the counters are read."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

import torch

from offload_moe import compat


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
    layer_calls: int = 0  # calls of layers that may miss (layers that never miss are not timed)
    missing_calls: int = 0  # ... of which some routed expert was not ready
    hook_seconds: float = 0.0  # their wall time in the hook, kernels and waits included
    kernel_seconds: float = 0.0  # ... of which in the stock experts kernel (CPU: compute; CUDA: launches)
    missing_hook_seconds: float = 0.0  # hook time of the calls with a missing expert (their share of the above) ...
    missing_kernel_seconds: float = 0.0  # ... and their kernel time
    kernel_passes: int = 0  # kernel calls on the pool: one per call, plus one per batch of copies landing later
    waves: int = 0  # layer calls that needed more distinct experts than their slot set holds at once
    substituted: int = 0  # (token, expert) pairs served by a stand-in instead of the real expert
    critical_misses: int = 0  # missed experts kept exact although a stand-in was configured (critical pairs)
    # host compute
    host_experts: int = 0  # experts computed on the host (per layer call: its one host job computes them all)
    host_tokens: int = 0  # (token, expert) pairs they served
    host_seconds: float = 0.0  # worker time of those jobs
    host_wait_seconds: float = 0.0  # compute thread on host results: blocked (a worker's), or computing them (inline)
    # the miss router (miss_path="auto")
    auto_host: int = 0  # missed experts the cost model sent to the host ...
    auto_copy: int = 0  # ... and to the link
    explored: int = 0  # ... misses sent to the host although estimated slower, to keep its estimate measured

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

    def runtime_seconds(self, missing: bool = False) -> float:
        """The hook's own time (bookkeeping, remap, copies issued): hook time less kernels and waits; of all timed
        calls, or of those with a missing expert."""
        if missing:
            hook, kernel = self.missing_hook_seconds, self.missing_kernel_seconds
            waits = self.stall_seconds + self.host_wait_seconds  # waits happen only in calls with misses
        else:
            hook, kernel, waits = self.hook_seconds, self.kernel_seconds, self.stall_seconds + self.host_wait_seconds
        return max(0.0, hook - kernel - waits)


class FixedHits:
    """Hits of the layers that never miss (every expert resident in its own slot), counted on the device, eager and
    compiled alike: no host sync on the decode path and O(1) memory; the counts reach the counters when they are
    read."""

    def __init__(self, counters: Counters, num_experts: int, device: torch.device):
        self._counters, self._num_experts = counters, num_experts
        self._counts = torch.zeros(counters.num_layers, dtype=torch.long, device=device)
        compat.mark_static_address(self._counts)  # a graph may update it in place under CUDA graphs

    def count(self, layer: int, top_k_index: torch.Tensor) -> None:
        if top_k_index.shape[0] == 1:  # one token: its top-k experts are distinct (a constant in a graph)
            self._counts[layer] += top_k_index.numel()
        else:
            seen = torch.zeros(self._num_experts, dtype=torch.long, device=top_k_index.device)
            self._counts[layer] += seen.index_fill_(0, top_k_index.flatten(), 1).sum()

    def flush(self) -> None:
        """Add the device counts to the counters."""
        c = self._counters
        counts = self._counts.tolist()
        if any(counts):
            c.hits += sum(counts)
            for layer, n in enumerate(counts):
                c.layer_hits[layer] += n
            self._counts.zero_()
