"""`OffloadOptions`: every option of `patch` and `load` besides the model, budget and device, validated once.

Its fields are the keyword arguments of `offload_moe.patch(model, budget, device, **options)` and
`offload_moe.load(path, budget, device, **options)`. Each field's meaning, default and the reason for that default
live in its `doc` metadata and nowhere else: the class docstring and docs/options.md are generated from them.
"""

from __future__ import annotations

import warnings
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from offload_moe.budget import size_bytes
from offload_moe.runtime.eviction import EVICTION_POLICIES, EvictionPolicy
from offload_moe.runtime.host_kernel import PRECISIONS as HOST_PRECISIONS
from offload_moe.runtime.miss_router import MissPath, MissPolicy, MissRouter
from offload_moe.runtime.pace import HostPace, LinkPace
from offload_moe.standins.kinds import KINDS
from offload_moe.standins.quant import BITS

MISS_PATHS = ("fetch", "host", "auto")
STANDINS = (None, *KINDS)
PREFETCHERS = ("lookahead", None)
PREFETCH_DEFAULT = None
PLACEMENTS = ("dynamic", "static-layers", "static-frequency")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
GROUPS = ("sizing", "cache", "miss path", "stand-ins", "prefetch", "host", "compile")
DEPRECATED = {"fallback": "miss_path"}  # old spelling -> new; accepted with a DeprecationWarning until 0.2


def option(default: Any, group: str, doc: str, why: str) -> Any:
    """A documented field: `doc` says what it does, `why` why its default is the default (one sentence)."""
    return field(default=default, metadata={"group": group, "doc": doc, "why": why})


@dataclass(frozen=True)
class OffloadOptions:
    eviction: str | EvictionPolicy | type[EvictionPolicy] = option(
        "lru",
        "cache",
        '"lru", "lfu", "layer" (evict the expert whose layer runs furthest ahead: better than LRU when the pool is '
        "smaller than one token's working set, worse above it), or an `EvictionPolicy` instance or subclass.",
        'LRU is O(1) per access and follows a workload that shifts; "layer" wins only below one token\'s working set.',
    )
    placement: str = option(
        "dynamic",
        "cache",
        'Which experts are on the device. "dynamic": the residency cache follows the routing. The static baselines '
        'people run today compute every miss on the host and never change what is resident: "static-layers" '
        "(llama.cpp's --n-cpu-moe: whole layers' experts resident, the last layers first) and "
        '"static-frequency" (kTransformers: the experts the calibration saw used most; needs `calibration`).',
        "It follows the routing as the workload changes and needs no calibration.",
    )
    chunk_bytes: int | None = option(
        None,
        "cache",
        "Copies move in pieces of this many bytes; a speculative copy yields to a demand copy at the next piece. "
        "None: 2 MiB.",
        "2 MiB pieces keep a PCIe link near its bandwidth while a demand copy waits at most one piece.",
    )
    miss_path: str | type[MissPolicy] | None = option(
        None,
        "miss path",
        "How a routed expert that is not on the device (a miss) is computed exactly (outputs equal the unpatched "
        'model\'s): "fetch" (copy it in and wait), "host" (compute it on the host, where its weights live; only '
        'activations cross the link), "auto" (per miss, whichever a measured cost model says finishes first), or '
        'a `MissPolicy` subclass. None: "auto" when the device is not the host (CUDA), else "fetch"; "host" under a '
        "static placement. Was `fallback`.",
        "Copying and host compute each win somewhere (decode vs a long prefill; a fast vs a slow link): the cost "
        "model picks per miss, and on a CPU device the host is the device, so there is nothing to choose.",
    )
    standin: str | None = option(
        None,
        "stand-ins",
        "What serves a missed (token, expert) pair instead of the real expert, losing accuracy: None (nothing), "
        '"drop" (skip it, renormalise the token\'s other weights), "buddy" (a resident substitute from '
        'calibration), "lowrank" (the expert\'s resident low-rank factors), "quant" (its resident `bits`-bit copy), '
        '"mixed" (per expert, the kind and bit width calibration found best, under one byte budget) or "lowbit" '
        "(HOBBIT: the missed expert's `bits`-bit host copy is copied in and used for this call). The real expert is "
        "still copied in the background.",
        "Lossless by default: a stand-in trades accuracy for speed, a choice the user makes.",
    )
    critical_weight: float = option(
        0.5,
        "stand-ins",
        "A missed pair with at least this routing weight is served exactly (by `miss_path`) whatever the stand-in "
        "(1.01: never).",
        "A pair with half the token's routing weight or more dominates its output: standing in for it costs the "
        "most accuracy.",
    )
    standin_fraction: float = option(
        0.1,
        "stand-ins",
        '"lowrank" stand-ins take this fraction of all experts\' bytes (at most 40% of the budget); "mixed" ones at '
        "most this fraction.",
        "A tenth of the experts' bytes buys a stand-in for every expert without halving the cache.",
    )
    bits: int = option(
        4,
        "stand-ins",
        'Bits per weight of the "quant" and "lowbit" stand-ins: 2, 3, 4 or 8.',
        "4 bits is the width HOBBIT's low-bit copies use; 2 and 3 bits lose more accuracy (the bench's stand-in "
        "table).",
    )
    group_size: int = option(
        64, "stand-ins", "Weights per scale and zero of the quantised stand-ins.", "HQQ's default group."
    )
    quant_optimize: bool = option(
        True,
        "stand-ins",
        "Refine the quantised stand-ins' zeros with HQQ's optimiser.",
        "It lowers the quantisation error at patch-time cost only.",
    )
    calibration: str | Path | None = option(
        None,
        "stand-ins",
        "A file written by `offload_moe.calibrate`: activation-aware stand-ins, buddy lists, thresholds, expert "
        'frequencies for the warm start; "buddy", "mixed" and placement="static-frequency" need one.',
        "Calibration needs text from the user's domain, which only the user has.",
    )
    prefetch: str | None = option(
        PREFETCH_DEFAULT,
        "prefetch",
        '"lookahead": apply the routers of the next `lookahead_depth` layers to the current residual stream and copy '
        "their `prefetch_candidates` most likely experts early (behind demand copies, which preempt them; it backs "
        "off at layers where its copies do not land in time). None: no prefetching.",
        "Where one copy takes many layers of compute (PCIe and large experts) a copy issued one layer ahead lands "
        "too late, and its probes still cost: pass it where copies are faster than a layer's compute.",
    )
    lookahead_depth: int = option(
        1, "prefetch", "Layers ahead the lookahead prefetcher predicts.", "Each further layer's guess is less accurate."
    )
    prefetch_candidates: int = option(
        1,
        "prefetch",
        "Experts per layer the lookahead prefetcher copies.",
        "Each extra candidate is a copy that evicts something for a lower chance of use.",
    )
    host_threads: int | None = option(
        None,
        "host",
        "Torch threads of the host worker. None: one per physical core it is pinned to (every core but the first, "
        "which drives the device); on a CPU device the calling thread computes the host's share with its own "
        "threads.",
        "The host path is bound by memory bandwidth, which every physical core helps to draw.",
    )
    host_precision: str | None = option(
        None,
        "host",
        'None: the host computes in the weights\' own precision, exactly. "int8" or "int4": LOSSY weight-only '
        "copies of every expert, built at patch time and multiplied by torch's CPU kernels (int8: one scale per "
        "output row; int4: one scale and zero per group of up to 128 inputs), used only for the host's share and "
        "only in calls of at most as many tokens per expert as they measured faster at patch time "
        '(`stats().host["lowbit_tokens"]`): longer calls read the native weights, which the host keeps. Independent '
        "of the stand-ins; needs an experts module that declares its layout (transformers' own).",
        "Lossless by default; the low-bit copies cost host RAM and accuracy, a choice the user makes.",
    )
    pin_memory: bool | None = option(
        None,
        "host",
        "On CUDA, move in-RAM host copies of the experts to pinned memory (asynchronous copies). None: pin when that "
        "applies (experts in RAM, device CUDA); `load()` keeps experts memory-mapped and never pins.",
        "Only pinned memory copies asynchronously at the link's full bandwidth.",
    )
    max_tokens: int = option(
        4096,
        "sizing",
        'Positions per sequence that `budget="auto"` keeps room for in the KV cache.',
        "A common context for local use; a longer one is the user's to name, as its cache is theirs to pay for.",
    )
    max_batch: int = option(
        1,
        "sizing",
        'Sequences decoded at once that `budget="auto"` keeps KV-cache room for.',
        "One user decoding one sequence is what an offloaded model mostly serves; a server names its batch.",
    )
    memory_margin: str | int = option(
        "1GiB",
        "sizing",
        '`budget="auto"` and `ram_budget="auto"` leave this much free (a size such as "512MiB", or bytes): '
        "activations, the allocator's slack, other processes.",
        "llama.cpp's --fit leaves 1,024 MiB by default; activations of a long prefill need about that.",
    )
    compile: bool | str = option(
        False,
        "compile",
        "torch.compile the model's forward as one graph: attention, norms, routers and the experts of layers that "
        "never miss are compiled; a layer that may miss is one opaque op run eager. Decode with a static KV cache "
        '(`generate(..., cache_implementation="static")`) to avoid recompiling. A string is torch.compile\'s mode: '
        '"reduce-overhead" adds CUDA graphs on a GPU.',
        "Compiling takes minutes on first use and recompiles as shapes change: worth it for long decoding, "
        "which the user knows of.",
    )

    def __post_init__(self) -> None:
        policy_class = isinstance(self.eviction, type) and issubclass(self.eviction, EvictionPolicy)
        if (
            not isinstance(self.eviction, EvictionPolicy)
            and not policy_class
            and self.eviction not in EVICTION_POLICIES
        ):
            raise ValueError(
                f"unknown eviction policy {self.eviction!r}; choose one of {sorted(EVICTION_POLICIES)}, "
                "or pass an EvictionPolicy subclass"
            )
        if self.miss_path in STANDINS[1:]:
            raise ValueError(
                f"miss_path={self.miss_path!r} is a lossy stand-in: pass standin={self.miss_path!r} (miss_path chooses "
                "how misses are computed exactly: 'fetch', 'host' or 'auto')"
            )
        policy = isinstance(self.miss_path, type) and issubclass(self.miss_path, MissPolicy)
        if self.miss_path is not None and not policy and self.miss_path not in MISS_PATHS:
            raise ValueError(f"unknown miss_path {self.miss_path!r}; choose one of {list(MISS_PATHS)} or None")
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
        if self.host_threads is not None and self.host_threads < 1:
            raise ValueError(f"host_threads must be >= 1, got {self.host_threads}")
        if self.host_precision not in HOST_PRECISIONS:
            raise ValueError(f"unknown host_precision {self.host_precision!r}; choose one of {list(HOST_PRECISIONS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {list(PLACEMENTS)}")
        if self.placement != "dynamic":
            if self.miss_path not in (None, "host"):
                raise ValueError(
                    f"placement={self.placement!r} computes every miss on the host; miss_path must be "
                    f"'host' or None, not {self.miss_path!r}"
                )
            if self.prefetch is not None:
                raise ValueError(f"placement={self.placement!r} never changes what is resident: pass prefetch=None")
        if self.placement == "static-frequency" and self.calibration is None:
            raise ValueError(
                "placement='static-frequency' keeps the experts the calibration saw used most: pass "
                "calibration=<a file from offload_moe.calibrate>"
            )
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(
                f"compile={self.compile!r}: pass True, False or a torch.compile mode {list(COMPILE_MODES)}"
            )
        if self.max_tokens < 1 or self.max_batch < 1:
            raise ValueError(f"max_tokens and max_batch must be >= 1, got {self.max_tokens} and {self.max_batch}")
        self.margin_bytes()  # a bad size is refused now, with budget_bytes' message
        if self.chunk_bytes is not None and self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        needs = KINDS[self.standin].calibration_for if self.standin is not None else None
        if needs is not None and self.calibration is None:
            raise ValueError(
                f"standin={self.standin!r} needs {needs}: pass calibration=<a file from offload_moe.calibrate>"
            )

    @classmethod
    def of(cls, options: OffloadOptions | None = None, **kwargs: Any) -> OffloadOptions:
        """`options` (of its own class: a subclass's extension points stay) with `kwargs` replacing its fields, or
        the defaults; unknown names are refused by name."""
        for old, new in DEPRECATED.items():
            if old in kwargs:
                warnings.warn(
                    f"{old}= is renamed {new}=; {old} will be removed in 0.2", DeprecationWarning, stacklevel=3
                )
                if new in kwargs:
                    raise TypeError(f"pass {new}= only (not also its old name {old}=)")
                kwargs[new] = kwargs.pop(old)
        names = [f.name for f in fields(cls if options is None else options)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; the options are {names}")
        return cls(**kwargs) if options is None else replace(options, **kwargs)

    def miss_setup(self, device_type: str) -> MissPath:
        """The exact-miss path in effect on a `device_type` device: `miss_path` (a policy class runs as "auto"), or
        its default for this device and placement."""
        if isinstance(self.miss_path, type):
            return MissPath("auto", self.miss_path)
        mode = self.miss_path or default_miss_path(device_type, self.placement)
        return MissPath(mode, None if mode == "fetch" else MissRouter)

    def margin_bytes(self) -> int:
        """`memory_margin` in bytes."""
        if isinstance(self.memory_margin, int) and not isinstance(self.memory_margin, bool):
            if self.memory_margin < 0:
                raise ValueError(f"memory_margin must be >= 0 bytes, got {self.memory_margin}")
            return self.memory_margin
        if not isinstance(self.memory_margin, str):
            raise TypeError(f"memory_margin must be a size such as '1GiB' or bytes, got {self.memory_margin!r}")
        return size_bytes(self.memory_margin, "memory_margin")

    def link_pace(self) -> LinkPace | None:
        """Extension point: how long each copy must take at least (a benchmark's emulated link, `tests/emulation.py`).
        None: as long as the real link takes."""
        return None

    def host_pace(self) -> HostPace | None:
        """Extension point: how long each host job must take at least (a benchmark's emulated host). None: as long as
        the real host takes."""
        return None


def default_miss_path(device_type: str, placement: str = "dynamic") -> str:
    """`miss_path=None` on a `device_type` device: a static placement computes misses on the host; otherwise "auto"
    where the device is not the host (CUDA), "fetch" where it is (nothing to choose between)."""
    return "host" if placement != "dynamic" else "auto" if device_type == "cuda" else "fetch"


def reference() -> str:
    """The options reference (docs/options.md and the class docstring): each field in its group, with its default
    and the reason for it."""
    out = []
    for group in GROUPS:
        out += [f"### {group}", ""]
        for f in fields(OffloadOptions):
            if f.metadata["group"] == group:
                default = "None" if f.default is None else repr(f.default) if f.default is not MISSING else "-"
                out += [
                    f"- **`{f.name}`** (default `{default}`): {f.metadata['doc']} *Why this default:* "
                    f"{f.metadata['why']}"
                ]
        out.append("")
    return "\n".join(out)


OffloadOptions.__doc__ = "How the expert residency cache behaves; every field:\n\n" + reference()
