"""Asynchronous host-to-device copies of experts, on one background worker that models one PCIe link.

A copy moves one or more parts (an expert each: a layer call submits all its misses at once) in chunks of about
`chunk_bytes` (whole rows of each weight, small weights together); each part lands, and is waited for, on its own.
On CUDA the worker issues each chunk on a dedicated copy stream and waits for it; the compute stream only waits when
an expert it needs is really still in flight. On CPU the worker thread does the copy itself. Copies have priorities:
a demand copy (something is waiting for it) goes before speculative ones (prefetches, background copies), a
speculative copy in progress is preempted at its next chunk boundary when a demand copy arrives (and resumed later,
where it stopped), and a speculative copy that someone starts waiting for is promoted. So a demand copy waits for at
most one chunk of speculation, never for a whole expert. A thread that waits for a part of a copy the worker has not
started moves the chunks up to it itself (one chunk on the link at a time still): waking the worker and being woken
by it costs more than a small copy.
A source is a host tensor or a `FileSpan` (bytes of a checkpoint file, read with pread: the link is then the disk,
and on CUDA the disk and the bus in turn through one pinned staging buffer).
A `LinkPace` (a benchmark's emulated link) makes every chunk take at least the time it says, so a CPU-only machine
can reproduce the behaviour of a PCIe link; results measured with it are emulated and must be reported as such.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import NamedTuple

import torch

from offload_moe.runtime.disk import FileSpan, read_span
from offload_moe.runtime.pace import LinkPace

DEMAND, PREFETCH = 0, 1  # copy priorities: lower goes first
CHUNK_BYTES = 2 << 20  # a copy's preemption granularity: 2 MiB chunks keep PCIe near its peak bandwidth
PART_DECAY = 0.8  # weight of the past in the measured link time of a part
CPU_SHARE_DECAY = 0.8  # weight of the past in the copies' measured CPU share


class Transfer:
    """One queued copy of one or more parts (an expert each: a list of source tensors into destination tensors),
    moved in chunks in order. Each part lands, and can be waited for, on its own: a layer call submits all its
    misses as one transfer and computes each expert as soon as its part is in."""

    __slots__ = (
        "after",
        "nbytes",
        "priority",
        "seq",
        "chunks",
        "ends",
        "next_chunk",
        "link_s",
        "_engine",
        "_error",
        "_error_at",
    )

    def __init__(self, parts, after, priority: int, seq: int, engine: TransferEngine, chunk_bytes: int):
        self.after = after  # CUDA events the first chunk waits for (the last kernels that read the slots)
        self.priority, self.seq, self._engine = priority, seq, engine
        self.chunks, self.ends, self.nbytes = chunk_parts(parts, chunk_bytes)  # in order
        self.next_chunk = 0  # chunks before it are in place (each chunk's copy is complete before it counts)
        self.link_s = 0.0  # link time spent on it so far
        self._error: BaseException | None = None
        self._error_at = 0  # chunks in place when it failed

    def done(self, part: int = -1) -> bool:
        """True once part `part` (default: the last, so every part) is in place or has failed (never blocks)."""
        return self.next_chunk >= self.ends[part]

    def failed(self, part: int = -1) -> bool:
        """True once the copy has ended in an error before part `part` was in place (never blocks)."""
        return self._error is not None and self._error_at < self.ends[part]

    def wait(self, part: int = -1) -> float:
        """Block until part `part` is in place; returns the seconds spent blocked (the stall)."""
        if not self.done(part):
            t0 = time.perf_counter()
            self._engine.move_here(self, self.ends[part])
            self._raise_if_failed(part)
            return time.perf_counter() - t0
        self._raise_if_failed(part)
        return 0.0

    def _fail(self, error: BaseException) -> None:
        self._error, self._error_at, self.next_chunk = error, self.next_chunk, len(self.chunks)

    def _raise_if_failed(self, part: int) -> None:
        if self.failed(part):
            raise RuntimeError(f"expert transfer failed: {self._error}") from self._error


class Chunk(NamedTuple):
    """What a copy moves in one go: `src` into `dst` (tensors in order), `begun` parts starting in it, `nbytes`."""

    src: list
    dst: list[torch.Tensor]
    begun: int
    nbytes: int


def chunk_parts(parts: list[tuple[list, list]], chunk_bytes: int) -> tuple[list[Chunk], list[int], int]:
    """Split a copy into chunks of about `chunk_bytes`: whole rows (dim 0) of each tensor, tensors in order, small
    tensors (of one part or the next) together. Returns the chunks, the chunk count once each part is complete, and
    the bytes."""
    total = sum(d.nbytes for _, part_dst in parts for d in part_dst)
    if total <= chunk_bytes:  # a layer call's misses of small experts: one chunk, built in one step
        src = [t for part_src, _ in parts for t in part_src]
        dst = [t for _, part_dst in parts for t in part_dst]
        return [Chunk(src, dst, sum(bool(p) for p, _ in parts), total)], [1] * len(parts), total
    sizes = [[d.nbytes for d in part_dst] for _, part_dst in parts]
    chunks: list[Chunk] = []
    ends = []
    src: list = []
    dst: list[torch.Tensor] = []
    size = begun = 0
    for (part_src, part_dst), part_sizes in zip(parts, sizes, strict=True):
        first = 1
        for s, d, nbytes in zip(part_src, part_dst, part_sizes, strict=True):
            rows = d.shape[0] if d.dim() else 1
            row_bytes = max(1, nbytes // rows)
            step = max(1, chunk_bytes // row_bytes)
            if src and (size + nbytes > chunk_bytes or step < rows):  # close the open chunk
                chunks.append(Chunk(src, dst, begun, size))
                src, dst, size, begun = [], [], 0, 0
            if d.dim() == 0 or step >= rows:  # the whole tensor in the open chunk
                src.append(s)
                dst.append(d)
                size, begun, first = size + nbytes, begun + first, 0
                continue
            for r in range(0, rows, step):
                chunks.append(Chunk([s[r : r + step]], [d[r : r + step]], first, min(step, rows - r) * row_bytes))
                first = 0
        ends.append(len(chunks) + (1 if src else 0))
    if src:
        chunks.append(Chunk(src, dst, begun, size))
    return chunks, ends, total


class TransferEngine:
    """Copy worker for one device. `submit` never blocks; `Transfer.wait` blocks only if the part is not in place.
    chunk_bytes: the size of the pieces a copy moves in (where a speculative copy can be preempted)."""

    def __init__(self, device: torch.device, pace: LinkPace | None = None, chunk_bytes: int = CHUNK_BYTES):
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.device = torch.device(device)
        self.pace, self.chunk_bytes = pace, chunk_bytes
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._queued: list[Transfer] = []
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the worker waits for copies on it
        self._landing = threading.Condition(lock)  # threads wait for a part the worker moves on it
        self._waiters = 0  # threads waiting on `_landing`
        self._seq = itertools.count()
        self._closing = False
        self._link_free_at = 0.0
        self._part_s: float | None = None  # measured link seconds per part (EMA over copies, warm-up included)
        self._cpu_share: float | None = None  # the share of a chunk's time its thread was on a CPU (EMA over chunks)
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
        """Queue a copy of `src` into `dst` (same shapes), one part; see `submit_parts`."""
        return self.submit_parts([(src, dst)], [after] if after is not None else [], priority, wake)

    def submit_parts(
        self,
        parts: list[tuple[list[torch.Tensor | FileSpan], list[torch.Tensor]]],
        after: list[torch.cuda.Event],
        priority: int = DEMAND,
        wake: bool = True,
    ) -> Transfer:
        """Queue one copy of `parts` [(sources, destinations)] in order; on CUDA it starts only after the events
        `after`. wake: False leaves the worker asleep (the caller will wait for a part, moving it itself, or call
        `wake`)."""
        with self._cond:
            if self._closing or not self._worker.is_alive():
                raise RuntimeError("the transfer engine is shut down")
            transfer = Transfer(parts, after, priority, next(self._seq), self, self.chunk_bytes)
            self._queued.append(transfer)
            if wake:
                self._cond.notify()
        return transfer

    def wake(self) -> None:
        """Start the worker on the queued copies."""
        with self._cond:
            if self._queued:
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
        """Measured link time of one part (one expert; an exponential average over every copy so far), None before
        any."""
        return self._part_s

    def link_use(self) -> dict[str, float]:
        """Totals so far: bytes and seconds on the link (their ratio is the bandwidth it achieved), the seconds on
        speculative copies, and how many speculative copies demand preempted."""
        return {
            "link_bytes": float(self._link_bytes),
            "link_seconds": self._link_seconds,
            "speculative_link_seconds": self._speculative_seconds,
            "preemptions": float(self._preemptions),
        }

    def cpu_share(self) -> float:
        """The share of link time the copying thread spends on a CPU (measured, 0 before any copy): near 1 for a
        memcpy or a read from the page cache, low for a DMA, a paced link or a read that waits for a disk."""
        return self._cpu_share or 0.0

    def demand_wait_seconds(self) -> float:
        """Estimated wait before a new demand copy would start: the rest of the chunk on the link (of every chunk,
        when it is a demand copy) and every demand copy queued before it."""
        part_s = self._part_s or 0.0
        with self._cond:
            current = self._current
            demand = sum(_left(t) * len(t.ends) for t in self._queued if t.priority == DEMAND)
        rest = 0.0
        if current is not None:
            rest = len(current.ends) * (_left(current) if current.priority == DEMAND else 1 / len(current.chunks))
        return (rest + demand) * part_s

    def move_here(self, transfer: Transfer, upto: int) -> None:
        """Someone waits for `transfer`'s chunks before `upto`: it becomes a demand copy, and if the worker has not
        started it, the calling thread moves those chunks now (the rest goes back in the queue); else it waits
        for the worker to move them."""
        with self._cond:
            transfer.priority = DEMAND
            if transfer not in self._queued:
                self._waiters += 1
                while transfer.next_chunk < upto:
                    self._landing.wait()
                self._waiters -= 1
                return
            self._queued.remove(transfer)
            self._helpers += 1
        try:
            while transfer.next_chunk < upto:
                self._move_chunk(transfer)
        except BaseException as e:  # surfaced by Transfer.wait
            transfer._fail(e)
            self._landed()
        rest = transfer.next_chunk < len(transfer.chunks)
        with self._cond:
            self._helpers -= 1
            if rest:
                self._queued.append(transfer)  # its seq keeps its place
            if self._queued:  # the worker may take them now; woken for nothing, it would only take the GIL
                self._cond.notify()
        if not rest:
            self._finish(transfer)

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
                transfer._fail(e)
                self._landed()
            if transfer.next_chunk < len(transfer.chunks):
                continue  # preempted: resumed later where it stopped
            with self._cond:
                self._current = None
            self._finish(transfer)

    def _finish(self, transfer: Transfer) -> None:
        part_s = transfer.link_s / len(transfer.ends)
        self._part_s = moving_average(self._part_s, part_s, PART_DECAY)

    def _landed(self) -> None:
        """Wake the threads waiting for a part the worker moves."""
        if self._waiters:
            with self._landing:
                self._landing.notify_all()

    def _move_chunk(self, transfer: Transfer) -> None:
        """Copy the transfer's next chunk, and hold the link for as long as the link (or its pace) takes."""
        with self._link:
            self._move_chunk_on_link(transfer)
        self._landed()

    def _move_chunk_on_link(self, transfer: Transfer) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        start = max(now, self._link_free_at)
        src, dst, begun, nbytes = transfer.chunks[transfer.next_chunk]
        self._copy(transfer, src, dst)
        if self.pace is not None:
            self._link_free_at = start + self.pace.chunk_seconds(nbytes, begun)
            delay = self._link_free_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        end = time.perf_counter()
        took = end - start
        share = min(1.0, (time.thread_time() - cpu) / (end - now)) if end > now else 1.0
        self._cpu_share = moving_average(self._cpu_share, share, CPU_SHARE_DECAY)
        transfer.next_chunk += 1
        transfer.link_s += took
        self._link_seconds += took
        self._link_bytes += nbytes
        if transfer.priority != DEMAND:
            self._speculative_seconds += took

    def _copy(self, transfer: Transfer, src: list[torch.Tensor | FileSpan], dst: list[torch.Tensor]) -> None:
        if self.stream is None:
            self._copy_all(src, dst)
            return
        with torch.cuda.stream(self.stream):
            if transfer.next_chunk == 0:
                for event in transfer.after:
                    self.stream.wait_event(event)  # the slots' previous experts are no longer read
            self._copy_all(src, dst)
            event = torch.cuda.Event()
            event.record(self.stream)
        event.synchronize()  # one chunk on the link at a time: priorities and preemption stay meaningful

    def _copy_all(self, src: list[torch.Tensor | FileSpan], dst: list[torch.Tensor]) -> None:
        """A chunk's copies: host tensors in one dispatch (a layer call's misses are one op, not one per piece),
        file spans one by one."""
        if len(src) > 1 and all(isinstance(t, torch.Tensor) for t in src):
            pinned = self.stream is not None and all(t.is_pinned() for t in src)
            torch._foreach_copy_(dst, src, non_blocking=pinned)
            return
        for s, d in zip(src, dst, strict=True):
            self._copy_one(s, d)

    def _copy_one(self, src: torch.Tensor | FileSpan, dst: torch.Tensor) -> None:
        if isinstance(src, torch.Tensor):
            dst.copy_(src, non_blocking=self.stream is not None and src.is_pinned())
            return
        if self._staging.numel() < src.nbytes:  # grown once to the largest chunk; reused after each chunk's sync
            self._staging = torch.empty(src.nbytes, dtype=torch.uint8, pin_memory=self.stream is not None)
        read_span(src, dst, self._staging)


def moving_average(past: float | None, new: float, decay: float) -> float:
    """An exponential moving average: `new` weighted 1 - `decay` against `past` (the first value as it is)."""
    return new if past is None else decay * past + (1 - decay) * new


def _left(transfer: Transfer) -> float:
    """The share of a copy's chunks not moved yet."""
    return (len(transfer.chunks) - transfer.next_chunk) / len(transfer.chunks)
