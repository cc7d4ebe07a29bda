"""The per-call hot path: a hook on each layer's experts module makes the routed experts resident, remaps expert ids
to slot ids and runs the stock transformers kernel on the slot pool, with the miss fallback and the prefetcher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hooks import ModuleHook

from .cache import ExpertCache, SlotWindow
from .fallbacks import LayerCall, MissFallback, MissPlan
from .prefetch import LookaheadPrefetcher


class ExpertsHook(ModuleHook):
    """Wraps one layer's experts module: residency, slot remap, fallback, then the stock kernel on the pool."""

    def __init__(
        self,
        layer: int,
        cache: ExpertCache,
        names: list[str],
        fallback: MissFallback | None,
        prefetcher: LookaheadPrefetcher | None,
    ):
        self.layer, self.cache, self.names = layer, cache, names
        self.fallback, self.prefetcher = fallback, prefetcher
        self._views: dict[tuple[int, int], list[torch.nn.Parameter]] = {}  # (lo, hi) -> pool views per weight

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
        cache, layer = self.cache, self.layer
        kernel = _Kernel(module, forward, self.names, hidden_states, args, kwargs)
        if cache.all_resident:  # budget 1.0: a fixed window, no residency work, no host sync
            window = cache.static_window(layer)
            cache.count_later(layer, top_k_index)
            return kernel.run(self._params(window), window, window.table[top_k_index], top_k_weights, masked=False)
        needed = top_k_index.unique().tolist()
        cache.begin_layer(layer, needed)
        plan, later = MissPlan(top_k_index, top_k_weights, needed), []
        if self.fallback is not None:
            missing = {e for e in needed if not cache.is_ready((layer, e))}
            if missing:
                call = LayerCall(layer, hidden_states, top_k_index, top_k_weights, needed, missing,
                                 cache.ready_experts(layer), module.act_fn)  # fmt: skip
                plan = self.fallback.plan(call)
                cache.record_fallback(plan.substituted, len(missing.intersection(plan.pool)))
                later = sorted(missing.difference(plan.pool))  # copied in the background, for the next tokens
        referenced = len(plan.index.unique()) if plan.index is not top_k_index else len(needed)
        if len(plan.pool) > cache.num_slots:
            cache.record_waves()  # more distinct experts than slots (long prefill, big batch): stream in waves
        out = None
        for i in range(0, len(plan.pool), cache.num_slots):
            wave = plan.pool[i : i + cache.num_slots]
            window = cache.acquire(layer, wave)
            if i == 0:
                self._look_ahead(plan.pool, later)
            masked = len(wave) < referenced  # routed pairs outside the wave go to the sentinel id with weight 0
            part = kernel.run(self._params(window), window, window.table[plan.index], plan.weights, masked)
            cache.release(layer, wave)
            out = part if out is None else out + part
        if out is None:  # every routed pair was served by the fallback: nothing ran on the pool
            self._look_ahead(plan.pool, later)
            out = torch.zeros_like(hidden_states)
        return out if plan.extra is None else out + plan.extra

    def _params(self, window: SlotWindow) -> list[torch.nn.Parameter]:
        """The pool's slots [lo, hi) as Parameters (views, cached): the kernel sees hi - lo experts."""
        key = (window.lo, window.hi)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = [
                torch.nn.Parameter(self.cache.pool[n][window.lo : window.hi], requires_grad=False) for n in self.names
            ]
        return views

    def _look_ahead(self, pool: list[int], later: list[int]) -> None:
        """After the demand copies: queue the next layers' predicted experts, then this layer's substituted ones."""
        protected = {(self.layer, e) for e in pool}
        if self.prefetcher is not None:
            self.prefetcher.run(self.layer, protected)
        for e in later:  # only into idle link time: when the link is the bottleneck, these copies would cost speed
            if self.cache.link_busy() or self.cache.load((self.layer, e), protected, speculative=True) is None:
                break


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
        saved = {n: module._parameters[n] for n in self.names}
        num_experts, was_parallel = module.num_experts, getattr(module, "_is_expert_parallel", False)
        module._parameters.update(zip(self.names, params, strict=True))
        module.num_experts = window.hi - window.lo
        if masked:
            weights = weights.masked_fill(slot_index == window.hi - window.lo, 0)
            module._is_expert_parallel = True  # makes batched_mm / grouped_mm skip sentinel ids
        try:
            return self.forward(self.hidden, slot_index, weights, *self.args, **self.kwargs)
        finally:
            module._parameters.update(saved)
            module.num_experts = num_experts
            module._is_expert_parallel = was_parallel
