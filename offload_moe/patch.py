"""`patch(model, budget=...)`: one call that makes a transformers MoE model run with only a budget of its experts on
the compute device, and `OffloadHandle`, which reports what happened and restores the model exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hooks import ModuleHook, MoEBlock, attach, detach, find_moe_blocks

from .budget import budget_bytes, format_bytes
from .cache import ExpertCache
from .eviction import EvictionPolicy, make_eviction
from .store import HostStore
from .transfer import EmulatedLink, TransferEngine

_HANDLE_ATTR = "_offload_moe_handle"
FALLBACKS = ("fetch",)


class ExpertsHook(ModuleHook):
    """Wraps one layer's experts module: makes the routed experts resident, then runs the stock kernel on the pool."""

    def __init__(self, layer: int, cache: ExpertCache, names: list[str]):
        self.layer, self.cache, self.names = layer, cache, names
        self._views: dict[tuple[int, int], list[torch.nn.Parameter]] = {}

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
        cache = self.cache
        if cache.all_resident:  # budget 1.0: a fixed table, no residency work, no host sync
            table, lo, hi = cache.static_table(self.layer)
            cache.count_later(self.layer, top_k_index)
            return self._on_pool(module, forward, hidden_states, table[top_k_index], top_k_weights, lo, hi, False,
                                 args, kwargs)  # fmt: skip
        needed = top_k_index.unique().tolist()
        cache.count(self.layer, needed)
        if len(needed) > cache.num_slots:
            cache.stats.waves += 1  # more distinct experts than slots (long prefill, big batch): stream in waves
        out = None
        for i in range(0, len(needed), cache.num_slots):
            wave = needed[i : i + cache.num_slots]
            table, lo, hi = cache.acquire(self.layer, wave)
            masked = len(wave) < len(needed)  # routed pairs outside the wave go to the sentinel id with weight 0
            part = self._on_pool(module, forward, hidden_states, table[top_k_index], top_k_weights, lo, hi, masked,
                                 args, kwargs)  # fmt: skip
            cache.release(self.layer, wave)
            out = part if out is None else out + part
        return out

    def _on_pool(self, module, forward, hidden_states, slot_index, weights, lo, hi, masked, args, kwargs):
        """Run the stock kernel on pool slots [lo, hi) (a view: the kernels see hi - lo experts, not the pool)."""
        views = self._views.get((lo, hi))
        if views is None:
            views = self._views[(lo, hi)] = [
                torch.nn.Parameter(self.cache.pool[n][lo:hi], requires_grad=False) for n in self.names
            ]
        params = module._parameters
        full = [params[n] for n in self.names]
        for n, v in zip(self.names, views, strict=True):
            params[n] = v
        module.num_experts = hi - lo
        was_parallel = getattr(module, "_is_expert_parallel", False)
        if masked:
            weights = weights.masked_fill(slot_index == hi - lo, 0)
            module._is_expert_parallel = True  # makes batched_mm / grouped_mm skip sentinel ids
        try:
            return forward(hidden_states, slot_index, weights, *args, **kwargs)
        finally:
            for n, p in zip(self.names, full, strict=True):
                params[n] = p
            module.num_experts = self.cache.num_slots
            module._is_expert_parallel = was_parallel


class OffloadHandle:
    """What `patch` returns: `stats()` reports the cache, `unpatch()` restores the model exactly."""

    def __init__(
        self,
        model: torch.nn.Module,
        blocks: list[MoEBlock],
        cache: ExpertCache,
        engine: TransferEngine,
        budget_bytes: int,
        restore: Callable[[], None],
    ):
        self.model, self.blocks, self.cache, self.engine = model, blocks, cache, engine
        self.budget_bytes = budget_bytes
        self._restore = restore
        self.patched = True

    def stats(self) -> dict[str, Any]:
        """Counters since `patch` (or the last `reset_stats`), as a plain dict."""
        self.cache.flush_counts()
        s = self.cache.stats
        needed = s.hits + s.misses
        return {
            "device": str(self.cache.device),
            "link": _link_info(self.engine.link, self.cache.device),
            "slots": self.cache.num_slots,
            "expert_bytes": self.cache.slot_bytes,
            "budget_bytes": self.budget_bytes,
            "resident_bytes": self.cache.resident_bytes,
            "hits": s.hits,
            "inflight_hits": s.inflight_hits,
            "misses": s.misses,
            "hit_rate": s.hits / needed if needed else 0.0,
            "copies": s.copies,
            "bytes_copied": s.bytes_copied,
            "stall_seconds": s.stall_seconds,
            "evictions": s.evictions,
            "waves": s.waves,
            "warmup_copies": s.warmup_copies,
            "per_layer": [
                {"layer": i, "name": b.name, "hits": s.layer_hits[i], "misses": s.layer_misses[i]}
                for i, b in enumerate(self.blocks)
            ],
        }

    def reset_stats(self) -> None:
        """Zero the counters (the cache's contents stay)."""
        self.cache.flush_counts()
        self.cache.stats = type(self.cache.stats)(self.cache.stats.num_layers)

    def unpatch(self) -> None:
        """Detach every hook and put the original expert parameters back: the model is as before `patch`."""
        if not self.patched:
            raise RuntimeError("this model was already unpatched")
        self._restore()
        self.patched = False


def _link_info(link: EmulatedLink | None, device: torch.device) -> dict[str, Any]:
    if link is not None:
        return {"emulated": True, "gbps": link.gbps, "latency_us": link.latency_us}
    return {"emulated": False, "gbps": None, "kind": "pcie" if device.type == "cuda" else "memcpy"}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` means CUDA when present, else CPU; anything else must name an available device."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device name; use 'cuda', 'cuda:1' or 'cpu'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked for CUDA, but torch sees no CUDA device; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r} is not supported; offload-moe runs on 'cuda' or 'cpu'")
    return dev


def patch(
    model: torch.nn.Module,
    budget: float | str = 1.0,
    device: str | torch.device | None = None,
    *,
    eviction: str | EvictionPolicy = "lru",
    fallback: str = "fetch",
    link: EmulatedLink | None = None,
    pin_memory: bool = True,
) -> OffloadHandle:
    """Keep only `budget` of `model`'s expert weights on `device`; every other weight goes to `device`.

    budget: a fraction of all experts' bytes in (0, 1], or a size such as "6GiB". The budget must hold at least one
    layer's top-k experts. `fallback="fetch"` waits for a missing expert, so outputs equal the unpatched model's.
    `link` emulates a slower host-to-device link (for CPU-only measurements; results are then emulated).
    `pin_memory`: on CUDA, keep host copies of the experts in pinned memory (asynchronous copies).
    """
    return _patch(model, budget, device, eviction, fallback, link, pin_memory, store=None)


def _patch(
    model: torch.nn.Module,
    budget: float | str,
    device: str | torch.device | None,
    eviction: str | EvictionPolicy,
    fallback: str,
    link: EmulatedLink | None,
    pin_memory: bool,
    store: HostStore | None,
) -> OffloadHandle:
    """`patch`, optionally with a ready host store (from `load`, whose experts are not in the model at all)."""
    if hasattr(model, _HANDLE_ATTR):
        raise RuntimeError("this model is already patched; call handle.unpatch() before patching it again")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose one of {list(FALLBACKS)}")
    dev = resolve_device(device)
    policy = make_eviction(eviction)
    if link is not None and not isinstance(link, EmulatedLink):
        raise TypeError(f"link must be an offload_moe.EmulatedLink or None, got {type(link).__name__}")
    blocks = find_moe_blocks(model)
    names = blocks[0].expert_param_names()
    originals = [{n: getattr(b.experts, n) for n in b.expert_param_names()} for b in blocks]
    if any(list(o) != names for o in originals):
        raise ValueError("MoE layers have different expert parameter names; offload-moe needs one layout")
    dtype = originals[0][names[0]].dtype

    total_experts = len(blocks) * blocks[0].num_experts
    expert_bytes = sum(p[0].numel() for p in originals[0].values()) * originals[0][names[0]].element_size()
    budget_b = budget_bytes(budget, total_experts * expert_bytes)
    top_k = max(b.top_k for b in blocks)
    num_slots = min(budget_b // expert_bytes, total_experts)
    if num_slots < top_k:
        raise ValueError(
            f"budget {format_bytes(budget_b)} holds {num_slots} expert(s) of {format_bytes(expert_bytes)}, but one "
            f"layer routes each token to {top_k}; raise the budget to at least {format_bytes(top_k * expert_bytes)} "
            f"(a fraction of at least {top_k / total_experts:.4f})"
        )

    orig_devices = [{n: p.device for n, p in o.items()} for o in originals]
    orig_num_experts = [b.experts.num_experts for b in blocks]
    orig_model_device = _first_non_expert_device(model, originals)
    from_checkpoint = store is not None
    engine = TransferEngine(dev, link)
    attached: list[MoEBlock] = []

    def restore() -> None:
        engine.shutdown()
        for b in attached:
            detach(b.experts)
        for b, o, devices, n in zip(blocks, originals, orig_devices, orig_num_experts, strict=True):
            fused = store.materialize(b.index, dtype) if from_checkpoint else None
            for name, p in o.items():
                if fused is not None:  # opened by `load`: the experts exist only in the checkpoint
                    p = torch.nn.Parameter(fused[name], requires_grad=False)
                elif p.device != devices[name]:
                    p.data = p.data.to(devices[name])
                setattr(b.experts, name, p)
            b.experts.num_experts = n
        if orig_model_device is not None and orig_model_device != dev:
            model.to(orig_model_device)
        if hasattr(model, _HANDLE_ATTR):
            delattr(model, _HANDLE_ATTR)

    try:
        if store is None:
            # Host copies: expert weights on an accelerator move to CPU memory (pinned for CUDA copies), in place.
            for o in originals:
                for p in o.values():
                    if p.device.type != "cpu":
                        p.data = p.data.to("cpu")
                    if pin_memory and dev.type == "cuda" and not p.data.is_pinned():
                        p.data = p.data.pin_memory()
            store = HostStore.from_fused([{n: p.data for n, p in o.items()} for o in originals])
        cache = ExpertCache(store, num_slots, dev, dtype, engine, policy)
        pool = {n: torch.nn.Parameter(t, requires_grad=False) for n, t in cache.pool.items()}
        for b in blocks:
            for n in names:
                setattr(b.experts, n, pool[n])
            b.experts.num_experts = num_slots
        model.to(dev)  # non-expert weights; the host store is no longer referenced by the model
        for b in blocks:
            attach(b.experts, ExpertsHook(b.index, cache, names))
            attached.append(b)
        # Warm start: spread the budget evenly over layers, lowest expert ids first; a layer-major order when all
        # experts fit, so each layer's experts sit in consecutive slots.
        if num_slots == total_experts:
            cache.warm([(b.index, e) for b in blocks for e in range(b.num_experts)])
        else:
            cache.warm([(b.index, e) for e in range(blocks[0].num_experts) for b in blocks])
    except BaseException:
        restore()
        raise
    handle = OffloadHandle(model, blocks, cache, engine, budget_b, restore)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def _first_non_expert_device(
    model: torch.nn.Module, originals: list[dict[str, torch.nn.Parameter]]
) -> torch.device | None:
    expert_ids = {id(p) for o in originals for p in o.values()}
    return next((p.device for p in model.parameters() if id(p) not in expert_ids), None)
