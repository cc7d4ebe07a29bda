"""`OffloadOptions`: every option of `patch` and `load` besides the model, budget and device, validated once.

Its fields are the keyword arguments of `offload_moe.patch(model, budget, device, **options)` and
`offload_moe.load(path, budget, device, **options)`; their meanings are documented here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from offload_moe.runtime.eviction import EVICTION_POLICIES, EvictionPolicy
from offload_moe.runtime.host import EmulatedHost
from offload_moe.runtime.transfer import EmulatedLink
from offload_moe.standins.kinds import KINDS
from offload_moe.standins.quant import BITS

FALLBACKS = ("fetch", "host", "auto")
STANDINS = (None, *KINDS)
PREFETCHERS = ("lookahead", None)
# Off by default, from measurement (docs/results.md, make bench): where one copy takes ~15 layers of compute (PCIe and
# Mixtral-sized experts), a prefetch issued one layer ahead lands too late, and even when it only backs off it costs
# its probes; pass prefetch="lookahead" where copies are faster than a layer's compute.
PREFETCH_DEFAULT = None
PLACEMENTS = ("dynamic", "static-layers", "static-frequency")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass(frozen=True)
class OffloadOptions:
    """How the expert residency cache behaves.

    eviction: "lru" (default), "lfu", "layer" (evict the expert whose layer runs furthest ahead: better than LRU
        when the pool is smaller than one token's working set, worse above it), or an `EvictionPolicy` instance.
    fallback: how a missed expert is computed exactly (outputs equal the unpatched model's): "fetch" (copy it to the
        device and wait), "host" (compute it on the host, where its weights live; only its output crosses the link)
        or "auto" (per miss, whichever a measured cost model says is faster). None: "auto" when the device is not
        the host (CUDA, or an emulated link), else "fetch".
    standin: what serves a missed (token, expert) pair instead of the real expert, losing accuracy: None (nothing:
        every miss is exact), "drop" (skip it, renormalise the token's other weights), "buddy" (a resident
        substitute from calibration), "lowrank" (the expert's resident low-rank stand-in), "quant" (its resident
        `bits`-bit copy), "mixed" (per expert, the kind and bit width calibration found best, under one byte
        budget) or "lowbit" (HOBBIT: the missed expert's `bits`-bit copy, kept on the host, is copied in at once,
        bits/16 of its bf16 bytes on the link, and used for this call; nothing resident). The real expert is still
        copied in the background for the next tokens.
    critical_weight: a missed pair with at least this routing weight is served exactly (by `fallback`) whatever the
        stand-in (1.01: never).
    prefetch: "lookahead" applies the routers of the next `lookahead_depth` layers to the current residual stream
        and copies their `prefetch_candidates` most likely experts early (behind demand copies, which preempt them;
        it backs off at layers where its copies do not land in time); None (default, measured faster where a copy
        takes longer than a few layers' compute) turns prefetching off.
    standin_fraction: "lowrank" stand-ins take this fraction of all experts' bytes, and at most 40% of the budget;
        "mixed" ones, this fraction at most.
    bits, group_size, quant_optimize: "quant" and "lowbit" stand-ins: bits per weight (2, 3, 4 or 8), weights per
        scale and zero, and HQQ's refinement of the zeros.
    calibration: a file written by `offload_moe.calibrate` (activation-aware stand-ins, buddy lists, thresholds,
        expert frequencies for the warm start); "buddy" needs one.
    link: an `EmulatedLink`: every copy takes latency + bytes / bandwidth (CPU-only measurements; emulated).
    host: an `EmulatedHost`: every host job takes at least bytes / bandwidth (CPU-only measurements; emulated).
    host_threads: torch threads per host worker (default: 1 when the device is this CPU, else all cores but one).
    pin_memory: on CUDA, move in-RAM host copies of the experts to pinned memory (asynchronous copies). None: pin
        when that applies (experts in RAM, device CUDA); `load()` keeps experts memory-mapped and never pins.
    compile: torch.compile the model's forward as one graph: attention, norms, routers and the experts of layers that
        never miss (budget 1.0; whole layers of a static placement) are compiled; a layer that may miss is one opaque
        op whose residency decisions, copies and kernel run eager. Decode with a static KV cache
        (`generate(..., cache_implementation="static")`) to avoid recompiling as the cache grows. Under continuous
        batching the forward runs eager (paged attention breaks every layer's graph). A string is torch.compile's
        mode: "reduce-overhead" runs the graph under CUDA graphs on a GPU (useful at budget 1.0, where nothing
        leaves the graph).
    placement: which experts are on the device. "dynamic" (default): the residency cache follows the routing. The
        static baselines people run today compute every miss on the host (a stand-in may serve the non-critical ones)
        and never change what is resident:
        "static-layers" (llama.cpp's --n-cpu-moe: whole layers' experts resident, the last layers first; the rest on
        the host) and "static-frequency" (kTransformers: the experts the calibration saw used most; needs one).
    chunk_bytes: copies move in pieces of this size; a speculative copy yields to a demand copy at the next piece
        (default 2 MiB).
    """

    eviction: str | EvictionPolicy | type[EvictionPolicy] = "lru"
    fallback: str | None = None
    standin: str | None = None
    critical_weight: float = 0.5
    prefetch: str | None = PREFETCH_DEFAULT
    lookahead_depth: int = 1
    prefetch_candidates: int = 1
    standin_fraction: float = 0.1
    bits: int = 4
    group_size: int = 64
    quant_optimize: bool = True
    calibration: str | Path | None = None
    link: EmulatedLink | None = None
    host: EmulatedHost | None = None
    host_threads: int | None = None
    pin_memory: bool | None = None
    compile: bool | str = False
    placement: str = "dynamic"
    chunk_bytes: int | None = None

    def __post_init__(self) -> None:
        policy_class = isinstance(self.eviction, type) and issubclass(self.eviction, EvictionPolicy)
        if (
            not isinstance(self.eviction, EvictionPolicy)
            and not policy_class
            and self.eviction not in EVICTION_POLICIES
        ):
            raise ValueError(f"unknown eviction policy {self.eviction!r}; choose one of {sorted(EVICTION_POLICIES)}, "
                             "or pass an EvictionPolicy subclass")  # fmt: skip
        if self.fallback in STANDINS[1:]:
            raise ValueError(
                f"fallback={self.fallback!r} is a lossy stand-in: pass standin={self.fallback!r} (fallback chooses how "
                "misses are computed exactly: 'fetch', 'host' or 'auto')"
            )
        if self.fallback is not None and self.fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {self.fallback!r}; choose one of {list(FALLBACKS)} or None")
        if self.standin is not None and self.standin not in KINDS:
            raise ValueError(f"unknown standin {self.standin!r}; choose one of {[None, *KINDS]}")
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
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits} is not supported; choose one of {list(BITS)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.link is not None and not isinstance(self.link, EmulatedLink):
            raise TypeError(f"link must be an offload_moe.EmulatedLink or None, got {type(self.link).__name__}")
        if self.host is not None and not isinstance(self.host, EmulatedHost):
            raise TypeError(f"host must be an offload_moe.EmulatedHost or None, got {type(self.host).__name__}")
        if self.host_threads is not None and self.host_threads < 1:
            raise ValueError(f"host_threads must be >= 1, got {self.host_threads}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {list(PLACEMENTS)}")
        if self.placement != "dynamic":
            if self.fallback not in (None, "host"):
                raise ValueError(f"placement={self.placement!r} computes every miss on the host; fallback must be "
                                 f"'host' or None, not {self.fallback!r}")  # fmt: skip
            if self.prefetch is not None:
                raise ValueError(f"placement={self.placement!r} never changes what is resident: pass prefetch=None")
        if self.placement == "static-frequency" and self.calibration is None:
            raise ValueError("placement='static-frequency' keeps the experts the calibration saw used most: pass "
                             "calibration=<a file from offload_moe.calibrate>")  # fmt: skip
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(
                f"compile={self.compile!r}: pass True, False or a torch.compile mode {list(COMPILE_MODES)}"
            )
        if self.chunk_bytes is not None and self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        needs = KINDS[self.standin].calibration_for if self.standin is not None else None
        if needs is not None and self.calibration is None:
            raise ValueError(f"standin={self.standin!r} needs {needs}: pass calibration=<a file from "
                             "offload_moe.calibrate>")  # fmt: skip

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

    def miss_path(self, device_type: str) -> str:
        """The exact-miss path in effect: `fallback`, or its default for this device."""
        if self.fallback is not None:
            return self.fallback
        if self.placement != "dynamic":
            return "host"
        return "auto" if device_type == "cuda" or self.link is not None else "fetch"
