"""Asynchronous host-to-device copies of experts, on one background worker that models one PCIe link.

A copy moves in chunks of about `chunk_bytes` (whole rows of each weight). On CUDA the worker issues each chunk on a
dedicated copy stream and records an event per chunk; the compute stream only waits when an expert it needs is really
still in flight. On CPU the worker thread does the copy itself. Copies have priorities: a demand copy (something is
waiting for it) goes before speculative ones (prefetches, background copies), a speculative copy in progress is
preempted at its next chunk boundary when a demand copy arrives (and resumed later, where it stopped), and a
speculative copy that someone starts waiting for is promoted. So a demand copy waits for at most one chunk of
speculation, never for a whole expert. A thread that waits for a copy the worker has not started moves it itself
(one chunk on the link at a time still): waking the worker and being woken by it costs more than a small copy.
A source is a host tensor or a `FileSpan` (bytes of a checkpoint file, read with pread: the link is then the disk,
and on CUDA the disk and the bus in turn through one pinned staging buffer).
An `EmulatedLink` makes every copy take `latency + bytes / bandwidth` of wall time, so a CPU-only machine can
reproduce the behaviour of a PCIe link; results measured with it are emulated and must be reported as such.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import torch

from offload_moe.runtime.disk import FileSpan, read_span


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
CHUNK_BYTES = 2 << 20  # a copy's preemption granularity: 2 MiB chunks keep PCIe near its peak bandwidth


class Transfer:
    """One queued copy of a list of source tensors into destination tensors, in chunks."""

    __slots__ = (
        "src",
        "dst",
        "after",
        "nbytes",
        "priority",
        "seq",
        "chunks",
        "next_chunk",
        "link_s",
        "_engine",
        "_issued",
        "_event",
        "_error",
    )

    def __init__(self, src, dst, after, priority: int, seq: int, engine: TransferEngine, chunk_bytes: int):
        self.src, self.dst, self.after = src, dst, after
        self.nbytes = sum(t.numel() * t.element_size() for t in dst)
        self.priority, self.seq, self._engine = priority, seq, engine
        self.chunks = _chunks(src, dst, chunk_bytes)  # [(src rows, dst rows)], in copy order
        self.next_chunk = 0  # chunks before it are on the device (or queued on the copy stream)
        self.link_s = 0.0  # link time spent on it so far
        self._issued = threading.Event()
        self._event: torch.cuda.Event | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once the data is in place (never blocks)."""
        if not self._issued.is_set():
            return False
        return self._event is None or self._event.query()

    def failed(self) -> bool:
        """True once the copy has ended in an error (never blocks)."""
        return self._issued.is_set() and self._error is not None

    def wait(self) -> float:
        """Block until the data is in place; returns the seconds spent blocked (the stall)."""
        if self.done():
            self._raise_if_failed()
            return 0.0
        t0 = time.perf_counter()
        if not self._engine.move_here(self):  # already on the link: wait for the worker
            self._issued.wait()
        self._raise_if_failed()
        if self._event is not None:
            self._event.synchronize()  # a real wait: the compute that needs this expert cannot start before
        return time.perf_counter() - t0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"expert transfer failed: {self._error}") from self._error


def _chunks(src: list[torch.Tensor | FileSpan], dst: list[torch.Tensor], chunk_bytes: int) -> list[tuple[list, list]]:
    """Split the copy into pieces of about `chunk_bytes`: whole rows (dim 0) of each tensor, tensors in order."""
    out: list[tuple[list, list]] = []
    for s, d in zip(src, dst, strict=True):
        rows = d.shape[0] if d.dim() else 1
        row_bytes = max(1, d.numel() * d.element_size() // max(rows, 1))
        step = max(1, chunk_bytes // row_bytes)
        if d.dim() == 0 or step >= rows:
            out.append(([s], [d]))
            continue
        out += [([s[r : r + step]], [d[r : r + step]]) for r in range(0, rows, step)]
    return out


class TransferEngine:
    """Copy worker for one device. `submit` never blocks; `Transfer.wait` blocks only if the copy is not done.
    chunk_bytes: the size of the pieces a copy moves in (where a speculative copy can be preempted)."""

    def __init__(self, device: torch.device, link: EmulatedLink | None = None, chunk_bytes: int = CHUNK_BYTES):
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.device = torch.device(device)
        self.link, self.chunk_bytes = link, chunk_bytes
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._queued: list[Transfer] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closing = False
        self._link_free_at = 0.0
        self._copy_s: float | None = None  # measured link seconds per whole copy (EMA over copies, warm-up included)
        self._link_seconds, self._link_bytes = 0.0, 0  # totals of every chunk
        self._speculative_seconds = 0.0  # ... of which for speculative copies
        self._preemptions = 0  # speculative copies set aside at a chunk boundary for a demand copy
        self._current: Transfer | None = None  # the copy on the link
        self._helpers = 0  # threads moving a copy they wait for themselves (speculation yields to them)
        self._link = threading.Lock()  # held while a chunk moves: one chunk on the link at a time
        self._staging = torch.empty(0, dtype=torch.uint8)  # the worker's buffer for file reads that cannot go direct
        self._worker = threading.Thread(target=self._run, name="offload-moe-copy", daemon=True)
        self._worker.start()

    def submit(
        self,
        src: list[torch.Tensor | FileSpan],
        dst: list[torch.Tensor],
        after: torch.cuda.Event | None = None,
        priority: int = DEMAND,
        wake: bool = True,
    ) -> Transfer:
        """Queue a copy of `src` into `dst` (same shapes); on CUDA it starts only after event `after` (if given).
        wake: False leaves the worker asleep (the caller will wait for the copy, moving it itself, or call `wake`)."""
        with self._cond:
            if self._closing or not self._worker.is_alive():
                raise RuntimeError("the transfer engine is shut down")
            transfer = Transfer(src, dst, after, priority, next(self._seq), self, self.chunk_bytes)
            self._queued.append(transfer)
            if wake:
                self._cond.notify()
        return transfer

    def wake(self) -> None:
        """Start the worker on the queued copies."""
        with self._cond:
            self._cond.notify()

    def queued(self, priority: int | None = None) -> int:
        """Copies waiting for the link (not counting the one in progress), of `priority` if given."""
        if priority is None:
            return len(self._queued)
        with self._cond:
            return sum(t.priority == priority for t in self._queued)

    def idle(self) -> bool:
        """Nothing on the link and nothing waiting for it."""
        with self._cond:
            return self._current is None and not self._queued and not self._helpers

    def copy_seconds(self) -> float | None:
        """Measured link time of one copy (an exponential average over every copy so far), None before any."""
        return self._copy_s

    def link_use(self) -> dict[str, float]:
        """Totals so far: bytes and seconds on the link (their ratio is the bandwidth it achieved), the seconds on
        speculative copies, and how many speculative copies demand preempted."""
        return {
            "link_bytes": float(self._link_bytes),
            "link_seconds": self._link_seconds,
            "speculative_link_seconds": self._speculative_seconds,
            "preemptions": float(self._preemptions),
        }

    def demand_wait_seconds(self) -> float:
        """Estimated wait before a new demand copy would start: the rest of the chunk on the link (the whole copy,
        when it is a demand copy) and every demand copy queued before it."""
        copy_s = self._copy_s or 0.0
        with self._cond:
            current = self._current
            demand = sum(t.priority == DEMAND for t in self._queued)
        rest = 0.0
        if current is not None:
            left = (len(current.chunks) - current.next_chunk) / len(current.chunks)
            rest = copy_s * (left if current.priority == DEMAND else 1 / len(current.chunks))
        return rest + demand * copy_s

    def move_here(self, transfer: Transfer) -> bool:
        """Someone waits for `transfer`: it becomes a demand copy, and if the worker has not started it, the calling
        thread moves it now (False: it is on the link already)."""
        with self._cond:
            transfer.priority = DEMAND
            if transfer not in self._queued:
                return False
            self._queued.remove(transfer)
            self._helpers += 1
        try:
            self._move_all(transfer)
        finally:
            with self._cond:
                self._helpers -= 1
                self._cond.notify()
        return True

    def shutdown(self) -> None:
        """Finish the queued copies, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._worker.join()

    def _next(self) -> Transfer | None:
        """The next copy for the worker. While a thread moves a copy it waits for, the worker takes only demand
        copies: the link's lock is not fair, and a worker that took speculative chunks back to back could hold it
        until the whole speculative copy is done."""
        with self._cond:
            while not self._closing and not any(t.priority == DEMAND or not self._helpers for t in self._queued):
                self._cond.wait()
            if not self._queued:
                return None
            transfer = min(self._queued, key=lambda t: (t.priority, t.seq))
            self._queued.remove(transfer)
            self._current = transfer
            return transfer

    def _preempted(self, transfer: Transfer) -> bool:
        """At a chunk boundary: a speculative copy yields to a demand copy (queued, or moved by a waiting thread),
        and goes back in the queue."""
        with self._cond:
            demand = self._helpers or any(t.priority == DEMAND for t in self._queued)
            if transfer.priority == DEMAND or not demand:
                return False
            self._queued.append(transfer)  # its seq keeps its place among speculative copies
            self._current = None
            self._preemptions += 1
            return True

    def _run(self) -> None:
        # One intra-op thread here: a second OpenMP team in this thread makes every small op of the compute
        # thread ~10x slower on CPU; the compute thread keeps its threads.
        torch.set_num_threads(1)
        while (transfer := self._next()) is not None:
            try:
                while transfer.next_chunk < len(transfer.chunks):
                    self._move_chunk(transfer)
                    if transfer.next_chunk < len(transfer.chunks) and self._preempted(transfer):
                        break
            except BaseException as e:  # surfaced to the waiter by Transfer.wait
                transfer._error = e
                transfer.next_chunk = len(transfer.chunks)
            if transfer.next_chunk < len(transfer.chunks):
                continue  # preempted: resumed later where it stopped
            with self._cond:
                self._current = None
            self._finish(transfer)

    def _move_all(self, transfer: Transfer) -> None:
        """Move every chunk of `transfer` left on the calling thread, then complete it."""
        try:
            while transfer.next_chunk < len(transfer.chunks):
                self._move_chunk(transfer)
        except BaseException as e:  # surfaced by Transfer.wait
            transfer._error = e
            transfer.next_chunk = len(transfer.chunks)
        self._finish(transfer)

    def _finish(self, transfer: Transfer) -> None:
        self._copy_s = transfer.link_s if self._copy_s is None else 0.8 * self._copy_s + 0.2 * transfer.link_s
        transfer._issued.set()

    def _move_chunk(self, transfer: Transfer) -> None:
        """Copy the transfer's next chunk, and hold the link for as long as the (emulated) link takes."""
        with self._link:
            self._move_chunk_on_link(transfer)

    def _move_chunk_on_link(self, transfer: Transfer) -> None:
        start = max(time.perf_counter(), self._link_free_at)
        src, dst = transfer.chunks[transfer.next_chunk]
        self._copy(transfer, src, dst)
        nbytes = sum(t.numel() * t.element_size() for t in dst)
        if self.link is not None:
            first = transfer.next_chunk == 0
            self._link_free_at = start + self.link.seconds(nbytes) - (0.0 if first else self.link.latency_us * 1e-6)
            delay = self._link_free_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        took = time.perf_counter() - start
        transfer.next_chunk += 1
        transfer.link_s += took
        self._link_seconds += took
        self._link_bytes += nbytes
        if transfer.priority != DEMAND:
            self._speculative_seconds += took

    def _copy(self, transfer: Transfer, src: list[torch.Tensor | FileSpan], dst: list[torch.Tensor]) -> None:
        if self.stream is None:
            for s, d in zip(src, dst, strict=True):
                self._copy_one(s, d)
            return
        with torch.cuda.stream(self.stream):
            if transfer.after is not None and transfer.next_chunk == 0:
                self.stream.wait_event(transfer.after)  # the slot's previous expert is no longer read
            for s, d in zip(src, dst, strict=True):
                self._copy_one(s, d)
            event = torch.cuda.Event()
            event.record(self.stream)
            transfer._event = event
        event.synchronize()  # one chunk on the link at a time: priorities and preemption stay meaningful

    def _copy_one(self, src: torch.Tensor | FileSpan, dst: torch.Tensor) -> None:
        if isinstance(src, torch.Tensor):
            dst.copy_(src, non_blocking=self.stream is not None and src.is_pinned())
            return
        if self._staging.numel() < src.nbytes:  # grown once to the largest chunk; reused after each chunk's sync
            self._staging = torch.empty(src.nbytes, dtype=torch.uint8, pin_memory=self.stream is not None)
        read_span(src, dst, self._staging)
