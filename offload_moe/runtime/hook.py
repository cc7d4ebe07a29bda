"""The per-call hot path: a hook on each layer's experts module makes the routed experts resident, remaps expert ids to
slot ids and runs the stock transformers kernel on the slot pool, with the exact miss path, the stand-ins and the
prefetcher.

A layer call that may miss takes its routing to the host once (`routing_on_host`: the lossless paths' one
synchronisation; lookahead, low-bit passes and stand-ins add theirs, see docs/offloading.md), then computes in passes of
the stock kernel over windows of the pool: first every routed expert that is ready, then each batch of missing experts
as their copies land (`ExpertCache.stream`), while the host computes the experts sent there. The passes return their
sums of weighted products unrounded where the kernel allows it (grouped_mm, the default, casts its input to the weights'
dtype and sums in float32 or wider): each pass computes its (token, expert) pairs as rows of their own, and the call
sums each token's rows in routing order and rounds once, as the stock kernel does, so outputs are bit-identical to the
unpatched model's (for calls of up to `PAIR_ELEMENTS` pair-row elements; larger ones add per-pass float32 sums, which
agree to float32 rounding before the final rounding). With another kernel the passes' outputs are added: bit-identical
with top-2 routing (each token's two products rounded once), within rounding above it.
"""

from __future__ import annotations

import enum
import functools
import itertools
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hooks import ModuleHook
from offload_moe import compat
from offload_moe.runtime.cache import ExpertCache, Residency
from offload_moe.runtime.counters import Counters, FixedHits
from offload_moe.runtime.host import HostCompute
from offload_moe.runtime.miss import LayerCall, MissPlan, StandinPolicy
from offload_moe.runtime.miss_router import MissRouter
from offload_moe.runtime.prefetch import LookaheadPrefetcher
from offload_moe.runtime.slots import KernelIndex
from offload_moe.runtime.speculation import Source

PASS_DECAY = 0.9  # weight of the past in the exponential average of a kernel pass's time
FEW_TOKENS = 16  # passes of up to this many tokens measure what another pass costs (its compute is not repeated)
PAIR_ELEMENTS = 1 << 22  # a call of up to this many (T x K x H) elements computes its pairs as rows (16 MiB float32)


class ExpertsHook(ModuleHook):
    """Wraps one layer's experts module: residency, stand-ins, slot remap, host jobs, then the stock kernel."""

    def __init__(
        self,
        layer: int,
        cache: ExpertCache,
        names: list[str],
        router: MissRouter | None,
        standin: StandinPolicy | None,
        prefetcher: LookaheadPrefetcher | None,
        host: HostCompute | None,
        counters: Counters,
        fixed_hits: FixedHits,
    ):
        self.layer, self.cache, self.names, self.counters = layer, cache, names, counters
        self.router, self.standin, self.prefetcher, self.host = router, standin, prefetcher, host
        self.fixed_hits = fixed_hits
        self.pass_seconds = 0.0  # what one more kernel pass costs (exponential average over calls of few tokens)
        self.fixed = cache.fixed_slots(layer) is not None  # never misses: the module holds its slots (patch)
        self.key = -1  # how a compiled graph's `offloaded_experts` op finds this hook: given on attach
        self._module: torch.nn.Module | None = None
        self._forward: Callable | None = None

    def init_hook(self, module: torch.nn.Module) -> None:
        self._module, self._forward = module, module.forward  # the forward before attach wraps it
        self.key = next(k for k in itertools.count() if k not in _LIVE)
        _LIVE[self.key] = self

    def detach_hook(self, module: torch.nn.Module) -> None:
        _LIVE.pop(self.key, None)

    def run(
        self,
        module: torch.nn.Module,
        forward: Callable,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K] expert ids
        top_k_weights: torch.Tensor,  # [T, K]
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.fixed:  # the stock forward on the module's own window: traceable, no host sync
            self.fixed_hits.count(self.layer, top_k_index)
            return forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        if torch.compiler.is_compiling():
            if not args and not kwargs:  # one opaque op in the graph, no graph break
                residual = self.prefetcher.residual(self.layer) if self.prefetcher is not None else None
                return offloaded_experts(hidden_states, top_k_index, top_k_weights, residual, self.key)
            return self._outside_graph(hidden_states, top_k_index, top_k_weights, *args, **kwargs)  # a graph break
        return self.offloaded(hidden_states, top_k_index, top_k_weights, *args, **kwargs)

    @torch.compiler.disable
    def _outside_graph(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.offloaded(*args, **kwargs)

    def offloaded(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K] expert ids
        top_k_weights: torch.Tensor,  # [T, K]
        *args: Any,
        residual: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """A layer whose experts may miss: residency decisions on the host, outside any compiled graph. residual:
        the layer's residual stream for the prefetcher, when a compiled graph passes it (eager, its hook keeps it)."""
        start = time.perf_counter()
        c, kernel_before = self.counters, self.counters.kernel_seconds
        ids, host_weights = routing_on_host(top_k_index, top_k_weights)  # the call's one host synchronisation
        needed = sorted(set(ids[0].tolist())) if len(ids) == 1 else np.unique(ids).tolist()
        residency = self.cache.prepare(self.layer, needed)
        kernel = _Kernel(self._module, self._forward, self.names, hidden_states, args, kwargs)
        if residency.missing or residency.inflight:
            call = _Call(self, kernel, ids, host_weights, needed, residency)
            out = call.run(hidden_states, top_k_index, top_k_weights, residual)
        else:  # every routed expert ready: the stock call on the pool, as unpatched
            if self.prefetcher is not None:
                self.prefetcher.run(self.layer, {(self.layer, e) for e in needed}, residual)
            out = self.stock(kernel, ids, top_k_index, top_k_weights, needed)
        took = time.perf_counter() - start
        c.layer_calls += 1
        c.hook_seconds += took
        if residency.missing or residency.inflight:
            c.missing_calls += 1
            c.missing_hook_seconds += took
            c.missing_kernel_seconds += c.kernel_seconds - kernel_before
        return out

    def stock(
        self, kernel: _Kernel, ids: np.ndarray, top_k_index: torch.Tensor, weights: torch.Tensor, experts: list[int]
    ) -> torch.Tensor:
        """The stock kernel on the pool over every routed expert (`experts`, all ready): exactly the unpatched call."""
        t0 = time.perf_counter()
        kidx = self.cache.kernel_index(self.layer, ids, top_k_index, experts, every=True)
        out = kernel.run(self.params(kidx.lo, kidx.hi), kidx, kernel.hidden, weights)
        self.cache.release(self.layer, experts)
        self.timed_pass(time.perf_counter() - t0, len(ids), len(experts))
        return out

    def timed_pass(self, took: float, tokens: int, experts: int) -> None:
        """A kernel pass over `tokens` tokens and `experts` experts took `took` seconds. Splitting a call into passes
        computes nothing twice, so what another pass costs is a pass's fixed part: measured on passes of few tokens,
        which also tell the miss policy what computing a copied expert costs the device."""
        c = self.counters
        c.kernel_passes += 1
        c.kernel_seconds += took
        if tokens <= FEW_TOKENS:
            self.pass_seconds = PASS_DECAY * self.pass_seconds + (1 - PASS_DECAY) * took
            if self.router is not None:
                self.router.observe_pass(experts, took)

    def params(self, lo: int, hi: int) -> list[torch.Tensor]:
        """The kernel weights' rows [lo, hi) (views: the kernel sees hi - lo experts). Plain tensors, not Parameters:
        `compat.point_experts` writes them into the module's parameter table, and a Parameter per window costs more
        than the window's own view (with spread routing most calls see a window of their own)."""
        weights = self.cache.kernel_weights()
        return [weights[n][lo:hi] for n in self.names]


class Serve(enum.Enum):
    """How one expert of a layer call is served."""

    READY = "ready"  # resident and landed: the first pass
    IN_FLIGHT = "in flight"  # resident, its copy on the link: a pass as it lands
    QUEUED = "queued"  # to be copied once a computed expert frees a slot
    ON_HOST = "on host"  # computed by the host job
    STANDIN = "stand-in"  # a stand-in serves its pairs (or a buddy took them)


ON_POOL = (Serve.READY, Serve.IN_FLIGHT, Serve.QUEUED)  # computed by kernel passes over the slot pool


class _Call:
    """One call of a layer that may miss, from its routing to its output."""

    def __init__(
        self,
        hook: ExpertsHook,
        kernel: _Kernel,
        ids: np.ndarray,
        host_weights: torch.Tensor,
        needed: list[int],
        residency: Residency,
    ):
        self.hook, self.kernel, self.cache, self.layer = hook, kernel, hook.cache, hook.layer
        self.ids, self.host_weights, self.needed, self.residency = ids, host_weights, needed, residency
        self.stock = False  # the output is the stock kernel's own call (final as it is)

    def run(
        self,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> torch.Tensor:
        hook, cache, layer, ids, needed = self.hook, self.cache, self.layer, self.ids, self.needed
        missing, inflight = self.residency.missing, self.residency.inflight
        self.sum = _Sum(self.kernel.module, hidden, top_k_weights)
        plan = MissPlan(top_k_index, top_k_weights, set(missing))
        if missing and hook.standin is not None:
            info = LayerCall(
                layer, hidden, top_k_index, top_k_weights, needed, set(missing), cache.ready_experts(layer)
            )
            plan = hook.standin.plan(info)
            hook.counters.substituted += plan.substituted
            hook.counters.critical_misses += len(plan.exact)
            if plan.index is not top_k_index:  # buddies remapped some pairs
                ids = plan.index.cpu().numpy()
        routed = needed if plan.index is top_k_index else np.unique(ids).tolist()
        state = dict.fromkeys(routed, Serve.READY)
        state.update(dict.fromkeys(inflight, Serve.IN_FLIGHT))
        state.update(dict.fromkeys(missing, Serve.STANDIN))  # until sent to the link or the host below
        copy, on_host = sorted(plan.exact), []
        if plan.exact and hook.router is not None:  # host or auto: some exact misses are computed on the host
            tally = np.bincount(ids.ravel())
            counts = {e: int(tally[e]) for e in plan.exact}
            to_link, to_host = hook.router.split(counts, admit=lambda e: cache.admits((layer, e)))
            copy, on_host = sorted(to_link), sorted(to_host)
        state.update(dict.fromkeys(on_host, Serve.ON_HOST))
        state.update(dict.fromkeys(copy, Serve.IN_FLIGHT))
        job = None
        if on_host:  # the routing weights' host copy, unless stand-ins changed them
            weights = self.host_weights if plan.weights is top_k_weights else plan.weights
            job = hook.host.submit(layer, on_host, hidden, weights, ids, self.sum.pairs, self.sum.out_dtype)
        pool = [e for e in routed if state[e] in ON_POOL]
        protected = {(layer, e) for e in pool}
        substituted = sorted(e for e, how in state.items() if how is Serve.STANDIN)
        state.update(dict.fromkeys(self._start(copy, protected, substituted, residual), Serve.QUEUED))
        done = None
        if job is not None and job.future is None:  # computed on this thread: while the link moves the copies
            if copy:
                cache.start()
            done = hook.host.result(job)
        out = None
        if pool:
            out = self._on_pool(ids, plan, pool, len(pool) == len(routed), state, protected)
        if job is not None:
            y, seconds = done if done is not None else hook.host.result(job)
            hook.router.observe([counts[e] for e in on_host], seconds)
            out = y if out is None else out + y
            # experts computed on the host and used more than what they would evict: copied in, in idle link time
            cache.speculate([(layer, e) for e in on_host], set(), Source.HOST)
        if out is None:  # stand-ins served every pair
            out = torch.zeros_like(hidden)
        elif not self.stock:
            out = self.sum.finish(out)
        return out if plan.extra is None else out + plan.extra

    def _start(
        self, copy: list[int], protected: set, substituted: list[int], residual: torch.Tensor | None
    ) -> list[int]:
        """Queue the call's demand copies (`copy`), then the speculative ones behind them (the next layers' predicted
        experts, this layer's `substituted` ones); returns the experts whose copies could not start yet (no slot
        free: computed experts make room)."""
        started = self.cache.fetch(self.layer, copy, protected)
        queued = copy[len(started) :]
        if queued:
            self.hook.counters.waves += 1
        self._look_ahead(protected, substituted, residual)  # behind the demand copies
        return queued

    def _on_pool(
        self, ids: np.ndarray, plan: MissPlan, pool: list[int], whole: bool, state: dict[int, Serve], protected: set
    ) -> torch.Tensor:
        """Compute the pool's experts in passes as the cache streams them in (`ExpertCache.stream`): the stock call
        when every routed expert is ready at once. whole: the pool has every routed expert."""
        waiting = [e for e in pool if state[e] is Serve.IN_FLIGHT]
        queued = [e for e in pool if state[e] is Serve.QUEUED]
        out = None
        for batch in self.cache.stream(self.layer, pool, waiting, queued, protected, self.hook.pass_seconds):
            if out is None and whole and len(batch) == len(pool):  # every routed expert ready now: the stock call
                self.stock = True
                return self.hook.stock(self.kernel, ids, plan.index, plan.weights, pool)
            part = self._pass(ids, plan, batch)
            out = part if out is None else out + part
        return out

    def _pass(self, ids: np.ndarray, plan: MissPlan, experts: list[int]) -> torch.Tensor:
        """One kernel pass over `experts` (ready), laid out as `_Sum` needs."""
        t0 = time.perf_counter()
        kidx = self.cache.kernel_index(self.layer, ids, plan.index, experts)
        hidden, kidx, weights = self.sum.pass_args(kidx, plan.weights)
        out = self.kernel.run(self.hook.params(kidx.lo, kidx.hi), kidx, hidden, weights)
        self.cache.release(self.layer, experts)
        self.hook.timed_pass(time.perf_counter() - t0, len(ids), len(experts))
        return out

    def _look_ahead(self, protected: set, later: list[int], residual: torch.Tensor | None) -> None:
        """After the demand copies: queue the next layers' predicted experts, then this layer's substituted ones."""
        hook = self.hook
        if hook.prefetcher is not None:
            hook.prefetcher.run(self.layer, protected, residual)
        if later:  # only into idle link time: when the link is the bottleneck, these copies would cost speed
            self.cache.speculate([(self.layer, e) for e in later], protected, Source.STANDIN)


class _Sum:
    """How a call's passes add up without rounding in between (see the module docstring): `hidden`, what the passes
    compute on ([T x K, H] one row per pair when `pairs`), and `finish`, the one rounding at the end."""

    def __init__(self, module: torch.nn.Module, hidden: torch.Tensor, weights: torch.Tensor):
        self._module, self._hidden, self._weights = module, hidden, weights
        self.dtype, (self.tokens, self.top_k) = hidden.dtype, weights.shape

    @functools.cached_property
    def _acc(self) -> torch.dtype | None:
        """The kernel's accumulation dtype where it takes wider input (float32 at least: torch's reductions of half
        types sum in float32); None where it takes only the weights' dtype."""
        if not compat.casts_input(self._module):
            return None
        return torch.promote_types(torch.promote_types(self.dtype, self._weights.dtype), torch.float32)

    @property
    def out_dtype(self) -> torch.dtype:
        """The dtype of the passes' outputs, before `finish`."""
        return self.dtype if self._acc is None else self._acc

    @functools.cached_property
    def pairs(self) -> bool:
        return self._acc is not None and self._hidden.numel() * self.top_k <= PAIR_ELEMENTS

    @functools.cached_property
    def hidden(self) -> torch.Tensor:
        if self._acc is None:
            return self._hidden  # [T, H]
        wide = self._hidden.to(self._acc)
        return wide.repeat_interleave(self.top_k, dim=0) if self.pairs else wide  # [T x K, H] or [T, H]

    def pass_args(self, kidx: KernelIndex, weights: torch.Tensor) -> tuple[torch.Tensor, KernelIndex, torch.Tensor]:
        """A pass's hidden states, slot ids and routing weights: pairs as rows of top-1 routing when `pairs`."""
        if not self.pairs:
            return self.hidden, kidx, weights
        return self.hidden, kidx._replace(index=kidx.index.reshape(-1, 1)), weights.reshape(-1, 1)

    def finish(self, total: torch.Tensor) -> torch.Tensor:
        """[T, H] in the hidden states' dtype: each token's rows summed in routing order, rounded once."""
        if self.pairs:
            total = total.view(self.tokens, self.top_k, -1).sum(dim=1)
        return total.to(self.dtype)


class _Kernel:
    """One call of the stock experts kernel, run on pool views instead of the module's own parameters."""

    def __init__(
        self,
        module: torch.nn.Module,
        forward: Callable,
        names: list[str],
        hidden: torch.Tensor,
        args: tuple,
        kwargs: dict,
    ):
        self.module, self.forward, self.names = module, forward, names
        self.hidden, self.args, self.kwargs = hidden, args, kwargs

    def run(
        self, params: list[torch.Tensor], kidx: KernelIndex, hidden: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """[T, H]: the pass's pairs (`kidx`) on `hidden` [T, H], weighted by `weights` [T, K]; skipped pairs weigh
        0."""
        module, skip = self.module, kidx.hi - kidx.lo
        if kidx.masked:  # the stock kernels skip sentinel ids (>= num_experts) in expert-parallel mode
            weights = weights.masked_fill(kidx.index == skip, 0)
        saved = compat.point_experts(module, dict(zip(self.names, params, strict=True)), skip, kidx.masked)
        try:
            return self.forward(hidden, kidx.index, weights, *self.args, **self.kwargs)
        finally:
            compat.restore_experts(module, saved)


def routing_on_host(index: torch.Tensor, weights: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """A layer call's routing on the host: ids [T, K] and weights [T, K]. On CUDA both are copied into pinned memory
    without blocking and waited for once, behind the router that computed them: the call's one synchronisation."""
    if index.is_cpu:
        return index.numpy(), weights
    ids = torch.empty(index.shape, dtype=index.dtype, pin_memory=True)
    host = torch.empty(weights.shape, dtype=weights.dtype, pin_memory=True)
    ids.copy_(index, non_blocking=True)
    host.copy_(weights, non_blocking=True)
    landed = torch.cuda.Event()
    landed.record(torch.cuda.current_stream(index.device))
    landed.synchronize()
    return ids.numpy(), host


# attached hooks by key. A hook takes the smallest free key, so a model patched again after `unpatch` compiles to
# the same graph as before, which inductor's cache then serves instead of compiling it anew.
_LIVE: weakref.WeakValueDictionary[int, ExpertsHook] = weakref.WeakValueDictionary()


# cudagraph_unsafe: a CUDA graph would replay its kernels without the decisions (inductor leaves such graphs uncaptured)
@torch.library.custom_op("offload_moe::offloaded_experts", mutates_args=(), tags=compat.cudagraph_unsafe_tags())
def offloaded_experts(
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, K]
    top_k_weights: torch.Tensor,  # [T, K]
    residual: torch.Tensor | None,  # the layer's residual stream, for the prefetcher
    hook: int,
) -> torch.Tensor:
    """A compiled graph's call into a layer whose experts may miss: opaque to the compiler (the residency decisions
    need the host), so the graph around it stays whole. Runs `ExpertsHook.offloaded` of the attached hook `hook`."""
    return _LIVE[hook].offloaded(hidden_states, top_k_index, top_k_weights, residual=residual)


@offloaded_experts.register_fake
def _(hidden_states, top_k_index, top_k_weights, residual, hook):
    return torch.empty_like(hidden_states)  # [T, H]: the stock experts kernels' output
