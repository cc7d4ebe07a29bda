"""Pacing hooks: how long a copy or a host job must take at least. Production runs have none (the real link and the
real host set the pace); a benchmark on a CPU-only machine passes emulators through an `OffloadOptions` subclass
(`tests/emulation.py`), and everything measured with one says EMULATED."""

from __future__ import annotations

from typing import Any, Protocol


class LinkPace(Protocol):
    def chunk_seconds(self, nbytes: int, parts_begun: int) -> float:
        """Wall seconds a chunk of `nbytes` must occupy the link; it begins `parts_begun` parts (each pays the
        link's per-copy latency once)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What `handle.stats().link` reports: {"emulated": True, ...}."""
        ...


class HostPace(Protocol):
    def reserve(self, start: float, nbytes: int, flops: float) -> float:
        """A host job that reads `nbytes` and computes `flops` is ready to start at `start` (perf_counter seconds):
        the time it may finish at the earliest (jobs share one memory system, so they queue)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What `handle.stats().host` reports: {"emulated": True, ...}."""
        ...
