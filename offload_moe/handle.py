"""`OffloadHandle`, what `patch` and `load` return: a typed statistics snapshot and an exact undo."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from hooks import MoEBlock
from offload_moe.options import OffloadOptions
from offload_moe.plan import Plan
from offload_moe.runtime.cache import ExpertCache
from offload_moe.runtime.counters import Counters, FixedHits
from offload_moe.runtime.host import HostCompute
from offload_moe.runtime.process import resident_memory, storage_read_bytes
from offload_moe.runtime.store import HostStore

_ATTR = "_offload_moe_handle"  # the handle lives on its model: both go together when a user drops the model


def handle_of(model: torch.nn.Module) -> OffloadHandle | None:
    """The live handle of a patched model, or None."""
    return model.__dict__.get(_ATTR)


@dataclass(frozen=True)
class LayerStats:
    layer: int
    name: str
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


@dataclass(frozen=True)
class OffloadStats:
    """Counters since `patch` (or the last `reset_stats`), and how the device memory is used.

    hits / misses: routed experts that were resident (or already being copied) / absent when their layer ran.
    substituted: (token, expert) pairs a lossy stand-in served instead of the real expert.
    """

    device: str
    link: dict[str, Any]  # {"emulated": bool, "gbps", ...} or {"emulated": False, "kind": "memcpy", "pcie", "disk+..."}
    host: dict[str, Any]  # {"emulated": bool, "gbps", "gflops"} of host compute
    miss_path: str  # the exact-miss path in effect: "fetch", "host", "auto" or a custom MissPolicy's name
    standin: str | None
    prefetch: str | None
    slots: int
    expert_bytes: int
    budget_bytes: int
    standin_bytes: int
    resident_bytes: int  # slot pool + stand-ins: never above budget_bytes
    hits: int
    inflight_hits: int
    misses: int
    copies: int
    bytes_copied: int
    stall_seconds: float
    evictions: int
    waves: int
    warmup_copies: int
    prefetches: int
    prefetches_used: int
    background_copies: int  # copies of experts a stand-in or the host served, in idle link time
    background_used: int  # ... used before being evicted
    speculation_skipped: int  # speculation rounds skipped at layers where the source did not pay
    placement: str  # "dynamic", "static-layers" or "static-frequency"
    link_seconds: float  # the link's busy time (with load(read="pread"), the disk reads included) ...
    speculative_link_seconds: float  # ... of which on speculative copies (demand preempts them between chunks)
    preemptions: int  # speculative copies set aside at a chunk boundary for a demand copy
    substituted: int
    critical_misses: int
    lowbit_copies: int  # standin="lowbit": low-bit copies fetched for one use (their bytes are in bytes_copied)
    host_experts: int  # missed experts computed on the host (per layer call)
    host_tokens: int  # (token, expert) pairs they served
    host_seconds: float  # host worker time
    host_wait_seconds: float  # compute thread blocked on host results
    auto_host: int  # miss_path="auto": missed experts sent to the host ...
    auto_copy: int  # ... and to the link
    explored: int  # ... misses sent to the host although estimated slower (so its estimate stays measured)
    layer_calls: int  # calls of layers that may miss (layers that never miss run the stock forward, untimed)
    missing_calls: int  # ... of which some routed expert was not ready
    kernel_passes: int  # stock-kernel calls on the pool: one per layer call, more while copies land
    kernel_seconds: float  # their time (CPU: the compute; CUDA: the launches)
    runtime_seconds: float  # the hook's own time in those calls: bookkeeping, remap, copies issued (no kernels, waits)
    missing_runtime_seconds: float  # ... of which in calls with a missing expert
    per_layer: tuple[LayerStats, ...]
    # the process (Linux; None elsewhere): bytes it read from storage since patch, `load` or reset_stats (reads of a
    # memory-mapped checkpoint count; page-cache hits do not), and its anonymous / file-backed resident memory now
    storage_read_bytes: int | None = None
    rss_anon_bytes: int | None = None
    rss_file_bytes: int | None = None
    # `load(..., ram_budget=)`: copies to the device served by the RAM tier / read from disk into it, and its size
    ram_hits: int = 0
    ram_misses: int = 0
    ram_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def runtime_us_per_call(self) -> float:
        """The hook's own microseconds per layer call that may miss."""
        return 1e6 * self.runtime_seconds / self.layer_calls if self.layer_calls else 0.0

    @property
    def runtime_us_per_miss(self) -> float:
        """The hook's own microseconds a missed expert adds to its call (over a call with none)."""
        quiet = self.layer_calls - self.missing_calls
        base = (self.runtime_seconds - self.missing_runtime_seconds) / quiet if quiet else 0.0
        extra = self.missing_runtime_seconds - base * self.missing_calls
        return 1e6 * extra / self.misses if self.misses else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Share of prefetched experts that were needed and had landed by then."""
        return self.prefetches_used / self.prefetches if self.prefetches else 0.0

    @property
    def fallback(self) -> str:
        """Deprecated: `miss_path` (removed in 0.2)."""
        warnings.warn(
            "OffloadStats.fallback is renamed miss_path; fallback will be removed in 0.2",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.miss_path

    def as_dict(self) -> dict[str, Any]:
        """Every field and derived rate, JSON-ready."""
        out = asdict(self)
        out["per_layer"] = [{**asdict(p), "hit_rate": p.hit_rate} for p in self.per_layer]
        return {
            **out,
            "hit_rate": self.hit_rate,
            "prefetch_precision": self.prefetch_precision,
            "runtime_us_per_call": self.runtime_us_per_call,
            "runtime_us_per_miss": self.runtime_us_per_miss,
        }


# The counters a snapshot reports as they are: every `Counters` field that `OffloadStats` declares under the same name
# (the rest of Counters is internal: per-layer lists, which `per_layer` reports, and the hook's raw timings, which
# `runtime_seconds` reports net of kernels and waits).
COUNTED = tuple(f.name for f in fields(Counters) if f.name in {g.name for g in fields(OffloadStats)})
INTERNAL_COUNTERS = frozenset(
    {"num_layers", "layer_hits", "layer_misses", "hook_seconds", "missing_hook_seconds", "missing_kernel_seconds"}
)


class OffloadHandle:
    """Reports what the cache did (`stats`) and restores the model exactly (`unpatch`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        blocks: list[MoEBlock],
        cache: ExpertCache,
        plan: Plan,
        options: OffloadOptions,
        undo: ExitStack,
        miss_path: str,
        counters: Counters,
        fixed_hits: FixedHits,
        workers: list[Callable[[], None]],
        read_base: int | None = None,
        host: HostCompute | None = None,
    ):
        """read_base: `storage_read_bytes()` when patching (or `load`) began; host: the host path, if any."""
        self.model, self.blocks, self.cache, self.plan, self.options = model, blocks, cache, plan, options
        self.miss_path, self._counters, self._fixed_hits = miss_path, counters, fixed_hits
        self._link_base = cache.link_use()  # the link's totals at patch time (warm-up copies included there)
        self._read_base = read_base
        self._ram_base = _ram_counts(cache)  # copies the RAM tier served / missed before the first forward
        self._undo, self._host = undo, host
        model.__dict__[_ATTR] = self
        # a patched model dropped without unpatch(): its worker threads stop when it is collected
        self._stop_workers = weakref.finalize(model, _call_all, workers)

    @property
    def patched(self) -> bool:
        return handle_of(self.model) is self

    @property
    def store(self) -> HostStore:
        """Where every expert lives on the host."""
        return self.cache.store

    def stats(self) -> OffloadStats:
        self._fixed_hits.flush()
        s = self._counters.snapshot()
        on_link = {k: v - self._link_base[k] for k, v in self.cache.link_use().items()}  # since patch / reset_stats
        read, rss = storage_read_bytes(), resident_memory()
        ram_hits, ram_misses = _ram_counts(self.cache)
        opt, link_pace, host_pace = self.options, self.options.link_pace(), self.options.host_pace()
        link_info = (
            link_pace.describe() if link_pace is not None else {"emulated": False, "kind": _link_kind(self.cache)}
        )
        host_info = host_pace.describe() if host_pace is not None else {"emulated": False}
        if self._host is not None and self._host.precision is not None:  # LOSSY: named wherever it is reported
            host_info |= {"precision": self._host.precision, "lowbit_tokens": self._host.lowbit_tokens}
        return OffloadStats(
            **{name: getattr(s, name) for name in COUNTED},
            device=str(self.cache.device),
            link=link_info,
            host=host_info,
            miss_path=self.miss_path,
            standin=opt.standin,
            prefetch=opt.prefetch,
            slots=self.cache.num_slots,
            expert_bytes=self.cache.slot_bytes,
            budget_bytes=self.plan.budget_bytes,
            standin_bytes=self.plan.standin_bytes,
            resident_bytes=self.cache.resident_bytes + self.plan.standin_bytes,
            placement=opt.placement,
            link_seconds=on_link["link_seconds"],
            speculative_link_seconds=on_link["speculative_link_seconds"],
            preemptions=int(on_link["preemptions"]),
            runtime_seconds=s.runtime_seconds(),
            missing_runtime_seconds=s.runtime_seconds(missing=True),
            per_layer=tuple(
                LayerStats(i, b.name, s.layer_hits[i], s.layer_misses[i]) for i, b in enumerate(self.blocks)
            ),
            storage_read_bytes=read - self._read_base if read is not None and self._read_base is not None else None,
            rss_anon_bytes=rss[0] if rss else None,
            rss_file_bytes=rss[1] if rss else None,
            ram_hits=ram_hits - self._ram_base[0],
            ram_misses=ram_misses - self._ram_base[1],
            ram_bytes=self.store.ram.nbytes if self.store.ram is not None else 0,
        )

    def reset_stats(self) -> None:
        """Zero the counters (the cache's contents stay)."""
        self._fixed_hits.flush()
        self._counters.reset()
        self._link_base = self.cache.link_use()
        self._read_base = storage_read_bytes()
        self._ram_base = _ram_counts(self.cache)

    def unpatch(self) -> None:
        """Detach every hook and put the original expert parameters back: the model is as before `patch`."""
        if not self.patched:
            raise RuntimeError("this model was already unpatched")
        del self.model.__dict__[_ATTR]
        self._stop_workers.detach()
        self._undo.close()


def _ram_counts(cache: ExpertCache) -> tuple[int, int]:
    ram = cache.store.ram
    return (ram.hits, ram.misses) if ram is not None else (0, 0)


def _link_kind(cache: ExpertCache) -> str:
    """What a copy crosses: the disk (the checkpoint's files, `load(read="pread")`), then PCIe on CUDA."""
    bus = "pcie" if cache.device.type == "cuda" else "memcpy"
    return f"disk+{bus}" if cache.store.reads_files() else bus


def _call_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()
