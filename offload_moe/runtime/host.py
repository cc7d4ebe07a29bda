"""Computing a missed expert where its weights live: on the host, from the host store, so that only its output
(tokens x hidden) crosses the link instead of the expert (Fiddler's and kTransformers' design).

A host job runs the experts module's own kernel on a one-expert twin of the module whose weights are the host
copies, so every expert layout the hook drives is computed exactly as the device would compute it. Jobs run on a
pool of worker threads concurrently with the device computing the layer's resident experts.

An `EmulatedHost` makes every job take at least `bytes / bandwidth` (and `flops / FLOP rate`) of wall time, one job
at a time on the host's memory, so a CPU-only machine reproduces the host-versus-link trade-off; results measured
with it are emulated and must be reported as such.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from offload_moe.runtime.counters import Counters
from offload_moe.runtime.kernels import expert_forward, one_expert_twin
from offload_moe.runtime.store import HostStore


@dataclass(frozen=True)
class EmulatedHost:
    """A host of `gbps` gigabytes per second of memory bandwidth and `gflops` of compute (emulated).

    Computing an expert for n tokens takes at least max(expert bytes / bandwidth, n x 2 x expert parameters / FLOP
    rate) of wall time, on top of the real compute; jobs share one memory system, so they do not overlap.
    """

    gbps: float
    gflops: float = float("inf")

    def __post_init__(self) -> None:
        if not self.gbps > 0 or not self.gflops > 0:
            raise ValueError(f"EmulatedHost needs gbps > 0 and gflops > 0, got {self.gbps} and {self.gflops}")

    def seconds(self, nbytes: int, flops: float) -> float:
        return max(nbytes / (self.gbps * 1e9), flops / (self.gflops * 1e9))


@dataclass
class HostJob:
    """The experts of one layer call computed on the host; `future` resolves to ([T, H] their weighted outputs
    summed per token, seconds the job took on its worker)."""

    layer: int
    experts: list[int]
    future: Future


class HostCompute:
    """Worker threads computing experts from the host store, one job per layer call.

    threads: torch intra-op threads per worker (1 when the device is this CPU, whose cores the compute thread uses).
    """

    def __init__(
        self,
        store: HostStore,
        experts_modules: list[torch.nn.Module],
        names: list[str],
        hidden_size: int,
        device: torch.device,
        counters: Counters,
        emulated: EmulatedHost | None = None,
        workers: int = 1,
        threads: int | None = None,
    ):
        self.store, self.names, self.hidden_size, self.device = store, names, hidden_size, device
        self.counters = counters  # writes host_jobs, host_tokens, host_seconds, host_wait_seconds
        self._twins = [one_expert_twin(m) for m in experts_modules]  # snapshots: the hook swaps the modules' weights
        self.emulated = emulated
        self.threads = threads or (1 if device.type == "cpu" else max(1, (os.cpu_count() or 2) - 1))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="offload-moe-host", initializer=self._init)
        self._lock = threading.Lock()
        self._memory_free_at = 0.0  # the emulated host's memory is busy until then
        self.expert_params = sum(torch.Size(s).numel() for s in store.expert_shapes.values())

    def _init(self) -> None:
        torch.set_num_threads(self.threads)

    def submit(
        self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor, ids: np.ndarray, pairs: bool
    ) -> HostJob:
        """Compute `experts` of `layer` for the tokens routed to them. ids [T, K]: the routing, on the host; weights
        [T, K] on the device; hidden: the device passes' input, [T, H], or [T x K, H] one row per (token, k) pair
        when `pairs` (then each pair's product comes back in its own row, unsummed)."""
        if self.device.type == "cuda":  # only activations cross the link: [T, H] down, [T, H] up
            hidden, weights = hidden.to("cpu", non_blocking=False), weights.to("cpu", non_blocking=False)
        future = self._pool.submit(self._run, layer, experts, hidden, weights, ids, pairs)
        return HostJob(layer, experts, future)

    def result(self, job: HostJob) -> tuple[torch.Tensor, float]:
        """The job's [T, H] output on the device and the seconds it took (blocks until it is done)."""
        t0 = time.perf_counter()
        y, seconds, pairs = job.future.result()
        c = self.counters
        c.host_wait_seconds += time.perf_counter() - t0
        c.host_jobs += len(job.experts)
        c.host_tokens += pairs
        c.host_seconds += seconds
        return (y.to(self.device, non_blocking=True) if self.device.type == "cuda" else y), seconds

    def _run(
        self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor, ids: np.ndarray, pairs: bool
    ) -> tuple[torch.Tensor, float, int]:
        start = time.perf_counter()
        if self.emulated is not None:  # reserve the emulated memory system before the real work starts
            with self._lock:
                begin = max(start, self._memory_free_at)
                flops = 2.0 * self.expert_params * int(np.isin(ids, experts).sum())
                self._memory_free_at = begin + self.emulated.seconds(self.store.expert_bytes() * len(experts), flops)
                done_at = self._memory_free_at
        out, n_pairs, top_k = torch.zeros_like(hidden), 0, ids.shape[1]  # [T, H] or [T x K, H]
        for e in experts:
            pos, tok = np.nonzero((ids == e).T)  # in the order the stock kernels gather an expert's rows
            rows = torch.from_numpy(tok * top_k + pos if pairs else tok)
            x, w = hidden[rows], weights[torch.from_numpy(tok), torch.from_numpy(pos)]
            y = expert_forward(self._twins[layer], self.names, self.store.expert_tensors(layer, e), x, w)
            out.index_add_(0, rows, y.to(out.dtype))
            n_pairs += len(tok)
        if self.emulated is not None:
            delay = done_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        return out, time.perf_counter() - start, n_pairs

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
