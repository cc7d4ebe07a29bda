"""Computing a missed expert where its weights live: on the host, from the host store, so that only its output
(tokens x hidden) crosses the link instead of the expert (Fiddler's and kTransformers' design).

A host job computes every host-assigned expert of one layer call (`runtime.host_kernel`: the module's own math as
plain matmuls on the host weights, checked bit for bit against its stock kernel at patch time), on a persistent
worker pinned to the host's physical cores while the device computes the layer's resident experts, or on the
calling thread where the device is this CPU.

A `HostPace` (a benchmark's emulated host) makes every job take at least the time it says, so a CPU-only machine
reproduces the host-versus-link trade-off; results measured with it are emulated and must be reported as such.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offload_moe.runtime.counters import Counters
from offload_moe.runtime.host_kernel import HostKernel, LowBit
from offload_moe.runtime.pace import HostPace
from offload_moe.runtime.store import HostStore

LOWBIT_PROBE_TOKENS = (2, 4, 8, 16, 32)  # tokens per expert at which the low-bit kernel is timed against the native


@dataclass
class HostJob:
    """The experts of one layer call computed on the host; `run` computes them, `future` (a worker's) resolves to
    ([T, H] their weighted outputs summed per token, or [T x K, H] per pair, seconds, pairs computed)."""

    layer: int
    experts: list[int]
    run: Callable[[], tuple[torch.Tensor, float, int]]
    future: Future | None = None


def physical_cores() -> list[int]:
    """One logical CPU per physical core this process may run on (Linux's topology; every allowed CPU elsewhere)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))
    seen, out = set(), []
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()
        except OSError:
            core = (cpu,)
        if core not in seen:
            seen.add(core)
            out.append(cpu)
    return out


@torch.no_grad()
def _median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall seconds of `fn()` over `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


class HostCompute:
    """Computes the host's share of a layer call's experts, one job per call.

    On a CPU device with a real host the job runs on the calling thread with all its cores (the device is this
    CPU: handing the job to another thread would cost a wake-up and split the same cores). Otherwise one persistent
    worker, pinned to every physical core but the first (the thread that drives the device keeps that one), computes
    while the device does. threads: torch threads for the worker (default: one per core it is pinned to).
    precision: None (the weights' own dtype, exact) or "int8" / "int4" (weight-only copies built here; lossy).
    """

    def __init__(
        self,
        store: HostStore,
        experts_modules: list[torch.nn.Module],
        names: list[str],
        hidden_size: int,
        device: torch.device,
        counters: Counters,
        pace: HostPace | None = None,
        threads: int | None = None,
        precision: str | None = None,
    ):
        self.store, self.names, self.hidden_size, self.device = store, names, hidden_size, device
        self._dtype = store.expert_dtype  # the kernels' input dtype
        self._cuda = device.type == "cuda"  # read per job: a device's `type` costs more than a flag
        self.counters = counters  # writes host_experts, host_tokens, host_seconds, host_wait_seconds
        self.pace, self.precision = pace, precision
        if precision is not None and store.packed is not None:
            raise ValueError(
                f"host_precision={precision!r} re-quantizes the experts, but this checkpoint already stores them "
                f"low-bit ({', '.join(store.packed.formats)}) and host compute reads that copy; leave host_precision "
                "unset"
            )
        self._kernels = [HostKernel(m, precision) for m in experts_modules]  # snapshots: the hook swaps weights
        self.direct = self._kernels[0].check(store.compute_pieces(0, 0), hidden_size, store.expert_dtype)
        if not self.direct:  # one class for every layer: where plain matmuls miss its bits, every layer keeps its twin
            for k in self._kernels:
                k.layout = None
        self._lowbit = self._build_lowbit() if precision is not None else {}
        self.lowbit_tokens = self._lowbit_crossover() if precision is not None else 0
        # the host is the device: the calling thread computes. A paced host stands for a GPU machine's, whose jobs run
        # beside the device's compute: on its worker
        self.inline = device.type == "cpu" and pace is None
        cores = physical_cores()
        self.cores = cores if device.type == "cpu" or len(cores) == 1 else cores[1:]
        self.threads = threads or len(self.cores)
        self._pool = None if self.inline else ThreadPoolExecutor(1, "offload-moe-host", initializer=self._init)
        self.expert_params = sum(torch.Size(s).numel() for s in store.expert_shapes.values())
        self._views: dict[tuple[int, int], dict[str, list[tuple[int, torch.Tensor]]]] = {}  # see `_pieces`

    def _init(self) -> None:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.cores)  # this thread only; torch's threads it starts inherit the set
        torch.set_num_threads(self.threads)
        torch.set_grad_enabled(False)  # this thread's mode: its jobs never build an autograd graph

    def _build_lowbit(self) -> dict[tuple[int, int], dict[str, LowBit]]:
        if not self._kernels[0].direct:
            raise ValueError(
                f"host_precision={self.precision!r} needs an experts module that declares its layout "
                "(transformers' use_experts_implementation); this model's does not"
            )
        return {
            (layer, e): self._kernels[layer].lowbit(self.store.expert_tensors(layer, e))
            for layer in range(self.store.num_layers)
            for e in range(self.store.num_experts)
        }

    def _lowbit_crossover(self) -> int:
        """The most tokens per expert for which the low-bit kernel beats the native one, timed once on one expert:
        torch's weight-only kernels win at decode but grow with tokens where a native matmul stays flat, so longer
        calls (a prefill) take the native weights, which the store holds anyway."""
        kernel, pieces, lowbit = self._kernels[0], self.store.compute_pieces(0, 0), self._lowbit[(0, 0)]
        best = 1
        for n in LOWBIT_PROBE_TOKENS:
            x, w = torch.randn(n, self.hidden_size).to(self.store.expert_dtype), torch.ones(n)
            native, low = (
                _median_seconds(functools.partial(kernel.forward, pieces, x, w, lb)) for lb in (None, lowbit)
            )
            if low >= native:
                break
            best = n
        return best

    def lowbit_for(self, layer: int, expert: int, tokens: int) -> dict[str, LowBit] | None:
        """The low-bit copy a call of `tokens` tokens for this expert computes with; None: the native weights."""
        return self._lowbit.get((layer, expert)) if tokens <= self.lowbit_tokens else None

    def host_bytes(self, layer: int, expert: int, tokens: int) -> int:
        """Bytes the host reads to compute one expert for `tokens` tokens: its low-bit copy where a call that size
        uses one."""
        parts = self.lowbit_for(layer, expert, tokens)
        if parts is None:
            return self.store.expert_bytes()
        dense = sum(p.shape[0] * p.shape[1] for p in parts.values()) * self.store.expert_dtype.itemsize
        return self.store.expert_bytes() - dense + sum(p.nbytes for p in parts.values())

    def submit(
        self,
        layer: int,
        experts: list[int],
        hidden: torch.Tensor,
        weights: torch.Tensor,
        ids: np.ndarray,
        pairs: bool,
        out_dtype: torch.dtype,
    ) -> HostJob:
        """Compute `experts` of `layer` for the tokens routed to them. hidden [T, H] (the layer's input, in the
        weights' dtype or cast to it here: the kernels multiply in the weights' dtype), weights [T, K] and ids [T, K]
        the routing (ids on the host). The output, in `out_dtype`, has a row per (token, k) pair, [T x K, H], when
        `pairs` (each pair's product unsummed), else [T, H]."""
        ready = None  # CUDA: the event after which the input is on the host
        if hidden.is_cuda:  # only activations cross the link: [T, H] down, [T, H] or [T x K, H] up
            staged = torch.empty(hidden.shape, dtype=self._dtype, pin_memory=True)
            staged.copy_(hidden, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(hidden.device))
            hidden = staged
        elif hidden.dtype != self._dtype:
            hidden = hidden.to(self._dtype)
        if not weights.is_cpu:  # the routing's host copy already, unless stand-ins changed the weights
            weights = weights.cpu()
        job = HostJob(
            layer, experts, functools.partial(self._run, layer, experts, hidden, weights, ids, pairs, out_dtype, ready)
        )
        if self._pool is not None:
            job.future = self._pool.submit(job.run)
        return job

    def result(self, job: HostJob) -> tuple[torch.Tensor, float]:
        """The job's output on the device and the seconds it took (blocks until it is done)."""
        t0 = time.perf_counter()
        y, seconds, pairs = job.run() if job.future is None else job.future.result()
        c = self.counters
        c.host_wait_seconds += time.perf_counter() - t0  # the compute thread's wait (inline: the job itself)
        c.host_experts += len(job.experts)
        c.host_tokens += pairs
        c.host_seconds += seconds
        return (y.pin_memory().to(self.device, non_blocking=True) if self._cuda else y), seconds

    def _pieces(self, layer: int, expert: int) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """An expert's weights as the kernel reads them: views, kept (a packed store decodes them on each use)."""
        if self.store.packed is not None:
            return self.store.compute_pieces(layer, expert)
        key = (layer, expert)
        pieces = self._views.get(key)
        if pieces is None:
            pieces = self._views[key] = self.store.compute_pieces(layer, expert)
        return pieces

    def _run(
        self,
        layer: int,
        experts: list[int],
        hidden: torch.Tensor,  # [T, H]
        weights: torch.Tensor,  # [T, K]
        ids: np.ndarray,  # [T, K]
        pairs: bool,
        out_dtype: torch.dtype,
        ready: torch.cuda.Event | None,
    ) -> tuple[torch.Tensor, float, int]:
        if ready is not None:
            ready.synchronize()  # the input's copy to the host (the compute thread never waits for it)
        start = time.perf_counter()
        if self.pace is not None:  # reserve the paced host before the real work starts
            flops = 2.0 * self.expert_params * int(np.isin(ids, experts).sum())
            nbytes = sum(self.host_bytes(layer, e, int((ids == e).sum())) for e in experts)
            done_at = self.pace.reserve(start, nbytes, flops)
        # no graph of the host's products where autograd is on; none to turn off in generation or on the worker
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            if len(ids) == 1 and self._kernels[layer].direct:  # decode: every expert at once
                out, n_pairs = self._one_token(layer, experts, hidden, weights, ids[0].tolist(), pairs, out_dtype)
            else:
                out, n_pairs = self._tokens(layer, experts, hidden, weights, ids, pairs, out_dtype)
        if self.pace is not None:
            delay = done_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        return out, time.perf_counter() - start, n_pairs

    def _one_token(
        self,
        layer: int,
        experts: list[int],
        hidden: torch.Tensor,  # [1, H]
        weights: torch.Tensor,  # [1, K]
        row: list[int],  # [K] the token's experts
        pairs: bool,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, int]:
        kernel, ks = self._kernels[layer], [row.index(e) for e in experts]
        ys = [kernel.project(self._pieces(layer, e), hidden, self.lowbit_for(layer, e, 1)) for e in experts]
        y = ys[0] if len(ys) == 1 else torch.cat(ys)  # [n, H] in the weights' dtype
        scale = weights[:, ks[0] : ks[0] + 1] if len(ks) == 1 else weights.view(-1, 1)[ks]  # [n, 1]
        # each product scaled as the kernel scales it: promoted to the wider of the two dtypes, exactly, in one op
        if pairs:
            out = torch.zeros(len(row), hidden.shape[1], dtype=out_dtype)  # [K, H]: a row per pair
            if len(ks) == 1:  # written straight into its row
                torch.mul(y, scale, out=out[ks[0] : ks[0] + 1])
            else:
                out[ks] = (y * scale).to(out_dtype)
            return out, len(experts)
        y = y * scale if len(ks) == 1 else (y * scale).sum(0, keepdim=True)  # [1, H]
        return (y if y.dtype == out_dtype else y.to(out_dtype)), len(experts)

    def _tokens(
        self,
        layer: int,
        experts: list[int],
        hidden: torch.Tensor,  # [T, H]
        weights: torch.Tensor,  # [T, K]
        ids: np.ndarray,  # [T, K]
        pairs: bool,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, int]:
        kernel, (tokens, top_k) = self._kernels[layer], ids.shape
        out = torch.zeros(tokens * top_k if pairs else tokens, hidden.shape[1], dtype=out_dtype)
        n_pairs = 0
        for e in experts:
            pos, tok = np.nonzero((ids == e).T)  # in the order the stock kernels gather an expert's rows
            picked = torch.from_numpy(tok)  # [n] the tokens routed to e
            rows = torch.from_numpy(tok * top_k + pos) if pairs else picked
            x, w = hidden[picked], weights[picked, torch.from_numpy(pos)]
            y = kernel.forward(self._pieces(layer, e), x, w, self.lowbit_for(layer, e, len(tok)))
            out.index_add_(0, rows, y if y.dtype == out_dtype else y.to(out_dtype))
            n_pairs += len(tok)
        return out, n_pairs

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
