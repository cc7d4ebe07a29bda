"""Emulated links and hosts for a CPU-only machine: a copy takes latency + bytes / bandwidth, a host job at least
max(bytes / bandwidth, FLOPs / rate), so the host-versus-link trade-off of a GPU machine can be reproduced here.
They reach `patch` and `load` through `Emulated`, an `OffloadOptions` whose pacing hooks they are; what is measured
with them is emulated and must be reported as such (the lab's benches import them from here)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from offload_moe.options import OffloadOptions, option


@dataclass(frozen=True)
class EmulatedLink:
    """A host-to-device link of `gbps` gigabytes per second and a fixed `latency_us` per copy (emulated)."""

    gbps: float
    latency_us: float = 0.0

    def __post_init__(self) -> None:
        if not self.gbps > 0:
            raise ValueError(f"EmulatedLink needs gbps > 0, got {self.gbps}")
        if self.latency_us < 0:
            raise ValueError(f"EmulatedLink needs latency_us >= 0, got {self.latency_us}")

    def seconds(self, nbytes: int) -> float:
        """One copy of `nbytes`, latency included."""
        return self.chunk_seconds(nbytes, 1)

    def chunk_seconds(self, nbytes: int, parts_begun: int) -> float:
        return parts_begun * self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)

    def describe(self) -> dict[str, Any]:
        return {"emulated": True, "gbps": self.gbps, "latency_us": self.latency_us}


@dataclass(frozen=True)
class EmulatedHost:
    """A host of `gbps` gigabytes per second of memory bandwidth and `gflops` of compute (emulated): computing an
    expert for n tokens takes at least max(expert bytes / bandwidth, n x 2 x expert parameters / FLOP rate) of wall
    time, on top of the real compute; jobs share one memory system, so they do not overlap."""

    gbps: float
    gflops: float = float("inf")
    _busy: list[float] = field(default_factory=lambda: [0.0], repr=False, compare=False)  # memory busy until then
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.gbps > 0 or not self.gflops > 0:
            raise ValueError(f"EmulatedHost needs gbps > 0 and gflops > 0, got {self.gbps} and {self.gflops}")

    def seconds(self, nbytes: int, flops: float) -> float:
        return max(nbytes / (self.gbps * 1e9), flops / (self.gflops * 1e9))

    def reserve(self, start: float, nbytes: int, flops: float) -> float:
        with self._lock:
            self._busy[0] = max(start, self._busy[0]) + self.seconds(nbytes, flops)
            return self._busy[0]

    def describe(self) -> dict[str, Any]:
        return {"emulated": True, "gbps": self.gbps, "gflops": self.gflops}


@dataclass(frozen=True)
class Emulated(OffloadOptions):
    """`OffloadOptions` with an emulated link and/or host: `patch(model, budget, "cpu", options=Emulated(link=...))`."""

    link: EmulatedLink | None = option(None, "emulation", "An `EmulatedLink`.", "A real link needs no emulation.")
    host: EmulatedHost | None = option(None, "emulation", "An `EmulatedHost`.", "A real host needs no emulation.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.link is not None and not isinstance(self.link, EmulatedLink):
            raise TypeError(f"link must be an EmulatedLink or None, got {type(self.link).__name__}")
        if self.host is not None and not isinstance(self.host, EmulatedHost):
            raise TypeError(f"host must be an EmulatedHost or None, got {type(self.host).__name__}")

    def link_pace(self) -> EmulatedLink | None:
        return self.link

    def host_pace(self) -> EmulatedHost | None:
        return self.host


def emulated(link: EmulatedLink | None = None, host: EmulatedHost | None = None, **options: Any) -> Emulated:
    """Options for `patch(..., options=emulated(link, host, miss_path=...))`."""
    return Emulated(link=link, host=host, **options)
