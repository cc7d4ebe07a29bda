"""`OffloadOptions`: every option of `patch` and `load` besides the model, budget and device, validated once.

Its fields are the keyword arguments of `offload_moe.patch(model, budget, device, **options)` and
`offload_moe.load(path, budget, device, **options)`; their meanings are documented here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .eviction import EVICTION_POLICIES, EvictionPolicy
from .transfer import EmulatedLink

FALLBACKS = ("fetch", "drop", "buddy", "lowrank")
PREFETCHERS = ("lookahead", None)


@dataclass(frozen=True)
class OffloadOptions:
    """How the expert residency cache behaves.

    eviction: "lru" (default), "lfu", "layer" (evict the expert whose layer runs furthest ahead: better than LRU
        when the pool is smaller than one token's working set, worse above it), or an `EvictionPolicy` instance.
    fallback: on a prefetch miss, "fetch" (copy it and wait: outputs equal the unpatched model's), "drop" (skip it,
        renormalise the token's other weights), "buddy" (a resident substitute from calibration) or "lowrank" (the
        expert's resident low-rank stand-in). Every lossy fallback still copies the real expert in the background.
    critical_weight: a missed (token, expert) pair with at least this routing weight is fetched whatever the
        fallback (1.01: never).
    prefetch: "lookahead" applies the routers of the next `lookahead_depth` layers to the current residual stream
        and copies their `prefetch_candidates` most likely experts early; None turns prefetching off.
    standin_fraction: "lowrank" stand-ins take this fraction of all experts' bytes, and at most 40% of the budget.
    calibration: a file written by `offload_moe.calibrate` (activation-aware stand-ins, buddy lists, thresholds,
        expert frequencies for the warm start); "buddy" needs one.
    link: an `EmulatedLink`: every copy takes latency + bytes / bandwidth (CPU-only measurements; emulated).
    pin_memory: on CUDA, move in-RAM host copies of the experts to pinned memory (asynchronous copies). None: pin
        when that applies (experts in RAM, device CUDA); `load()` keeps experts memory-mapped and never pins.
    compile: torch.compile the attention modules; the residency logic and the experts kernels stay eager.
    """

    eviction: str | EvictionPolicy = "lru"
    fallback: str = "fetch"
    critical_weight: float = 0.5
    prefetch: str | None = "lookahead"
    lookahead_depth: int = 1
    prefetch_candidates: int = 1
    standin_fraction: float = 0.1
    calibration: str | Path | None = None
    link: EmulatedLink | None = None
    pin_memory: bool | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.eviction, EvictionPolicy) and self.eviction not in EVICTION_POLICIES:
            raise ValueError(f"unknown eviction policy {self.eviction!r}; choose one of {sorted(EVICTION_POLICIES)}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {self.fallback!r}; choose one of {list(FALLBACKS)}")
        if self.prefetch not in PREFETCHERS:
            raise ValueError(f"unknown prefetch {self.prefetch!r}; choose 'lookahead' or None")
        if not 0 < self.critical_weight <= 1.01:
            raise ValueError(f"critical_weight must be in (0, 1] (or 1.01 to never gate), got {self.critical_weight}")
        if self.lookahead_depth < 1 or self.prefetch_candidates < 1:
            raise ValueError(
                f"lookahead needs depth >= 1 and candidates >= 1, got {self.lookahead_depth} and "
                f"{self.prefetch_candidates}"
            )
        if not 0 < self.standin_fraction < 1:
            raise ValueError(f"standin_fraction must be in (0, 1), got {self.standin_fraction}")
        if self.link is not None and not isinstance(self.link, EmulatedLink):
            raise TypeError(f"link must be an offload_moe.EmulatedLink or None, got {type(self.link).__name__}")
        if self.fallback == "buddy" and self.calibration is None:
            raise ValueError("fallback='buddy' needs buddy lists: pass calibration=<a file from offload_moe.calibrate>")

    @classmethod
    def of(cls, options: OffloadOptions | None = None, **kwargs: Any) -> OffloadOptions:
        """`options` with `kwargs` replacing its fields (or the defaults); unknown names are refused by name."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; the options are {names}")
        if options is None:
            return cls(**kwargs)
        return cls(**{**{n: getattr(options, n) for n in names}, **kwargs})
