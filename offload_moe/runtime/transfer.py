"""Asynchronous host-to-device copies of experts, on one background worker that models one PCIe link.

On CUDA the worker issues copies on a dedicated copy stream and records an event per transfer; the compute stream
only waits when an expert it needs is really still in flight. On CPU the worker thread does the copy itself.
Copies have priorities: a demand copy (something is waiting for it) goes before speculative ones (prefetch), and a
queued prefetch that someone starts waiting for is promoted. One copy is on the link at a time, so a demand copy
never queues behind more than the copy in progress.
An `EmulatedLink` makes every copy take `latency + bytes / bandwidth` of wall time, so a CPU-only machine can
reproduce the behaviour of a PCIe link; results measured with it are emulated and must be reported as such.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import torch


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
        return self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)


DEMAND, PREFETCH = 0, 1  # copy priorities: lower goes first


class Transfer:
    """One queued copy of a list of source tensors into destination tensors."""

    __slots__ = ("src", "dst", "after", "nbytes", "priority", "seq", "_engine", "_issued", "_event", "_error")

    def __init__(self, src, dst, after, priority: int, seq: int, engine: TransferEngine):
        self.src, self.dst, self.after = src, dst, after
        self.nbytes = sum(t.numel() * t.element_size() for t in dst)
        self.priority, self.seq, self._engine = priority, seq, engine
        self._issued = threading.Event()
        self._event: torch.cuda.Event | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once the data is in place (never blocks)."""
        if not self._issued.is_set():
            return False
        return self._event is None or self._event.query()

    def wait(self) -> float:
        """Block until the data is in place; returns the seconds spent blocked (the stall)."""
        if self.done():
            self._raise_if_failed()
            return 0.0
        t0 = time.perf_counter()
        self._engine.promote(self)  # someone needs it now
        self._issued.wait()
        self._raise_if_failed()
        if self._event is not None:
            self._event.synchronize()  # a real wait: the compute that needs this expert cannot start before
        return time.perf_counter() - t0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError("expert transfer failed") from self._error


class TransferEngine:
    """Copy worker for one device. `submit` never blocks; `Transfer.wait` blocks only if the copy is not done."""

    def __init__(self, device: torch.device, link: EmulatedLink | None = None):
        self.device = torch.device(device)
        self.link = link
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._queued: list[Transfer] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closing = False
        self._link_free_at = 0.0
        self._copy_s: float | None = None  # measured seconds per copy (EMA over copies, warm-up included)
        self._link_seconds, self._link_bytes = 0.0, 0  # totals of every copy
        self._current: float | None = None  # start time of the copy on the link
        self._worker = threading.Thread(target=self._run, name="offload-moe-copy", daemon=True)
        self._worker.start()

    def submit(
        self,
        src: list[torch.Tensor],
        dst: list[torch.Tensor],
        after: torch.cuda.Event | None = None,
        priority: int = DEMAND,
    ) -> Transfer:
        """Queue a copy of `src` into `dst` (same shapes); on CUDA it starts only after event `after` (if given)."""
        with self._cond:
            if self._closing or not self._worker.is_alive():
                raise RuntimeError("the transfer engine is shut down")
            transfer = Transfer(src, dst, after, priority, next(self._seq), self)
            self._queued.append(transfer)
            self._cond.notify()
        return transfer

    def queued(self) -> int:
        """Copies waiting for the link (not counting the one in progress)."""
        return len(self._queued)

    def copy_seconds(self) -> float | None:
        """Measured link time of one copy (an exponential average over every copy so far), None before any."""
        return self._copy_s

    def link_totals(self) -> tuple[int, float]:
        """(bytes, seconds) of every copy so far: their ratio is the bandwidth the link achieved."""
        return self._link_bytes, self._link_seconds

    def demand_wait_seconds(self) -> float:
        """Estimated wait before a new demand copy would start: the rest of the copy on the link and every demand
        copy queued before it (prefetches queue behind demand copies)."""
        copy_s = self._copy_s or 0.0
        with self._cond:
            current = self._current
            demand = sum(t.priority == DEMAND for t in self._queued)
        rest = max(0.0, current + copy_s - time.perf_counter()) if current is not None else 0.0
        return rest + demand * copy_s

    def promote(self, transfer: Transfer) -> None:
        """Make a queued copy a demand copy (no-op once it started)."""
        with self._cond:
            transfer.priority = DEMAND

    def shutdown(self) -> None:
        """Finish the queued copies, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._worker.join()

    def _next(self) -> Transfer | None:
        with self._cond:
            while not self._queued and not self._closing:
                self._cond.wait()
            if not self._queued:
                return None
            transfer = min(self._queued, key=lambda t: (t.priority, t.seq))
            self._queued.remove(transfer)
            self._current = max(time.perf_counter(), self._link_free_at)
            return transfer

    def _run(self) -> None:
        # One intra-op thread here: a second OpenMP team in this thread makes every small op of the compute
        # thread ~10x slower on CPU (measured: index_add_ 3.8 us -> 40 us); the compute thread keeps its threads.
        torch.set_num_threads(1)
        while (transfer := self._next()) is not None:
            start = max(time.perf_counter(), self._link_free_at)
            try:
                self._copy(transfer)
                if transfer._event is not None:
                    transfer._event.synchronize()  # one copy on the link at a time: priorities stay meaningful
            except BaseException as e:  # surfaced to the waiter by Transfer.wait
                transfer._error = e
            if self.link is not None:
                self._link_free_at = start + self.link.seconds(transfer.nbytes)
                delay = self._link_free_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            took = time.perf_counter() - start
            self._copy_s = took if self._copy_s is None else 0.8 * self._copy_s + 0.2 * took
            self._link_seconds += took
            self._link_bytes += transfer.nbytes
            with self._cond:
                self._current = None
            transfer._issued.set()

    def _copy(self, transfer: Transfer) -> None:
        if self.stream is None:
            for s, d in zip(transfer.src, transfer.dst, strict=True):
                d.copy_(s)
            return
        with torch.cuda.stream(self.stream):
            if transfer.after is not None:
                self.stream.wait_event(transfer.after)  # the slot's previous expert is no longer read
            for s, d in zip(transfer.src, transfer.dst, strict=True):
                d.copy_(s, non_blocking=s.is_pinned())
            event = torch.cuda.Event()
            event.record(self.stream)
            transfer._event = event
