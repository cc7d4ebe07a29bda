"""The per-call hot path: a hook on each layer's experts module makes the routed experts resident, remaps expert ids
to slot ids and runs the stock transformers kernel on the slot pool, with the miss fallback and the prefetcher."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from hooks import ModuleHook
from offload_moe import compat
from offload_moe.runtime.cache import ExpertCache, SlotWindow
from offload_moe.runtime.counters import Counters
from offload_moe.runtime.host import HostCompute
from offload_moe.runtime.miss_router import MissRouter
from offload_moe.runtime.prefetch import LookaheadPrefetcher
from offload_moe.standins.policies import LayerCall, MissPlan, StandinPolicy


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
    ):
        self.layer, self.cache, self.names, self.counters = layer, cache, names, counters
        self.router, self.standin, self.prefetcher, self.host = router, standin, prefetcher, host
        self._views: dict[tuple[int, int], list[torch.nn.Parameter]] = {}  # (lo, hi) -> pool views per weight
        self.fixed = cache.fixed_slots(layer) is not None  # never misses: the module holds its slots (patch)
        self.key = next(_KEYS)  # how a compiled graph's `offloaded_experts` op finds this hook
        self._module: torch.nn.Module | None = None
        self._forward: Callable | None = None

    def init_hook(self, module: torch.nn.Module) -> None:
        self._module, self._forward = module, module.forward  # the forward before attach wraps it
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
            self.cache.count_fixed(self.layer, top_k_index)
            return forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        if torch.compiler.is_compiling() and not args and not kwargs:  # one opaque op in the graph, no graph break
            residual = self.prefetcher.residual(self.layer) if self.prefetcher is not None else None
            return offloaded_experts(hidden_states, top_k_index, top_k_weights, residual, self.key)
        return self.offloaded(hidden_states, top_k_index, top_k_weights, *args, **kwargs)

    @torch.compiler.disable
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
        cache, layer = self.cache, self.layer
        kernel = _Kernel(self._module, self._forward, self.names, hidden_states, args, kwargs)
        needed = top_k_index.unique().tolist()
        missing, ready = cache.prepare(layer, needed)
        plan = MissPlan(top_k_index, top_k_weights, missing)
        if missing and self.standin is not None:
            call = LayerCall(layer, hidden_states, top_k_index, top_k_weights, needed, missing, ready)
            plan = self.standin.plan(call)
            self.counters.substituted += plan.substituted
            self.counters.critical_misses += len(plan.exact)
        routed = plan.index.unique().tolist() if plan.index is not top_k_index else needed
        copy, jobs = plan.exact, []
        if plan.exact and self.router is not None:  # host or auto: some exact misses are computed on the host
            # (k positions, tokens) of each expert's pairs, in the order the stock kernels gather them
            pairs = {e: torch.nonzero((plan.index == e).T, as_tuple=True) for e in plan.exact}
            copy, on_host = self.router.split(
                {e: len(tok) for e, (_, tok) in pairs.items()}, admit=lambda e: cache.admits((layer, e))
            )
            for e in sorted(on_host):  # submitted first: the host computes while the device does
                pos, tok = pairs[e]
                jobs.append(self.host.submit(layer, e, hidden_states[tok], plan.weights[tok, pos], tok))
        pool = [e for e in routed if e not in missing or e in copy]
        later = sorted(missing.difference(plan.exact))  # substituted: copied in the background, for the next tokens
        out = self._on_pool(kernel, pool, plan, len(routed), later, residual)
        for job in jobs:
            y, seconds = self.host.result(job)
            self.router.observe(len(job.tokens), seconds)
            out.index_add_(0, job.tokens, y)
        # experts computed on the host and used more than what they would evict: copied in, in idle link time
        cache.speculate([(layer, job.expert) for job in jobs], set(), "host")
        return out if plan.extra is None else out + plan.extra

    def _on_pool(self, kernel: _Kernel, pool: list[int], plan: MissPlan, routed: int, later: list[int],
                 residual: torch.Tensor | None):  # fmt: skip
        """Run the pool's experts in waves of at most `slots` experts; [T, H] (zeros when the pool is empty)."""
        cache = self.cache
        if len(pool) > cache.num_slots:
            self.counters.waves += 1  # more distinct experts than slots (long prefill, big batch): stream in waves
        out = None
        for i in range(0, len(pool), cache.num_slots):
            wave = pool[i : i + cache.num_slots]
            window = cache.acquire(self.layer, wave)
            if i == 0:
                self._look_ahead(pool, later, residual)
            masked = len(wave) < routed  # routed pairs outside the wave: sentinel id, weight 0
            part = kernel.run(self._params(window), window, window.table[plan.index], plan.weights, masked)
            cache.release(self.layer, wave)
            out = part if out is None else out + part
        if out is None:  # every routed pair was served by a stand-in or the host: nothing ran on the pool
            self._look_ahead(pool, later, residual)
            out = torch.zeros_like(kernel.hidden)
        return out

    def _params(self, window: SlotWindow) -> list[torch.nn.Parameter]:
        """The pool's slots [lo, hi) as Parameters (views, cached): the kernel sees hi - lo experts."""
        key = (window.lo, window.hi)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = [
                torch.nn.Parameter(self.cache.pool[n][window.lo : window.hi], requires_grad=False) for n in self.names
            ]
        return views

    def _look_ahead(self, pool: list[int], later: list[int], residual: torch.Tensor | None) -> None:
        """After the demand copies: queue the next layers' predicted experts, then this layer's substituted ones."""
        protected = {(self.layer, e) for e in pool}
        if self.prefetcher is not None:
            self.prefetcher.run(self.layer, protected, residual)
        # only into idle link time: when the link is the bottleneck, these copies would cost speed
        self.cache.speculate([(self.layer, e) for e in later], protected, "standin")


class _Kernel:
    """One call of the stock experts kernel, run on pool views instead of the module's own parameters."""

    def __init__(self, module: torch.nn.Module, forward: Callable, names: list[str], hidden: torch.Tensor,
                 args: tuple, kwargs: dict):  # fmt: skip
        self.module, self.forward, self.names = module, forward, names
        self.hidden, self.args, self.kwargs = hidden, args, kwargs

    def run(
        self,
        params: list[torch.nn.Parameter],
        window: SlotWindow,
        slot_index: torch.Tensor,  # [T, K] slot ids relative to window.lo
        weights: torch.Tensor,  # [T, K]
        masked: bool,
    ) -> torch.Tensor:
        module = self.module
        saved = compat.swap_parameters(module, dict(zip(self.names, params, strict=True)))
        num_experts, was_parallel = module.num_experts, compat.set_expert_parallel(module, masked)
        module.num_experts = window.hi - window.lo
        if masked:  # the stock kernels skip sentinel ids (>= num_experts) in expert-parallel mode
            weights = weights.masked_fill(slot_index == window.hi - window.lo, 0)
        try:
            return self.forward(self.hidden, slot_index, weights, *self.args, **self.kwargs)
        finally:
            compat.swap_parameters(module, saved)
            module.num_experts = num_experts
            compat.set_expert_parallel(module, was_parallel)


_KEYS = itertools.count()
_LIVE: weakref.WeakValueDictionary[int, ExpertsHook] = weakref.WeakValueDictionary()  # attached hooks by key


# cudagraph_unsafe: a CUDA graph would replay its kernels without the decisions (inductor leaves such graphs uncaptured)
@torch.library.custom_op("offload_moe::offloaded_experts", mutates_args=(), tags=(torch._C.Tag.cudagraph_unsafe,))
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
