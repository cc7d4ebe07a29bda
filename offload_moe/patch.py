"""`patch(model, budget=...)`: one call that makes a transformers MoE model run with only a budget of its experts on
the compute device, and `OffloadHandle`, which reports what happened and restores the model exactly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hooks import ModuleHook, MoEBlock, attach, detach, find_moe_blocks

from .budget import budget_bytes, format_bytes
from .cache import ExpertCache
from .calibrate import expert_weights, load_calibration
from .eviction import EvictionPolicy, make_eviction
from .fallbacks import Buddy, Drop, LowRank, MissFallback
from .prefetch import LookaheadPrefetcher
from .standins import StandIns, lowrank, rank_for_fraction
from .store import HostStore
from .transfer import EmulatedLink, TransferEngine

_HANDLE_ATTR = "_offload_moe_handle"
FALLBACKS = ("fetch", "drop", "buddy", "lowrank")
PREFETCHERS = ("lookahead", None)
STANDIN_BUDGET_SHARE = 0.4  # stand-ins never take more than this share of the budget: the pool needs the rest


@dataclass(frozen=True)
class Options:
    """Everything `patch` and `load` accept besides the model, budget and device (see `patch`)."""

    eviction: str | EvictionPolicy = "lru"
    fallback: str = "fetch"
    prefetch: str | None = "lookahead"
    lookahead_depth: int = 1
    prefetch_candidates: int = 1
    critical_weight: float = 0.5
    standin_fraction: float = 0.1
    calibration: str | Path | None = None
    link: EmulatedLink | None = None
    pin_memory: bool = True
    compile: bool = False


class ExpertsHook(ModuleHook):
    """Wraps one layer's experts module: makes the routed experts resident, then runs the stock kernel on the pool."""

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
        cache, layer = self.cache, self.layer
        if cache.all_resident:  # budget 1.0: a fixed table, no residency work, no host sync
            table, lo, hi = cache.static_table(layer)
            cache.count_later(layer, top_k_index)
            return self._on_pool(module, forward, hidden_states, table[top_k_index], top_k_weights, lo, hi, False,
                                 args, kwargs)  # fmt: skip
        needed = top_k_index.unique().tolist()
        cache.eviction.at_layer(layer, cache.store.num_layers)
        cache.count(layer, needed)
        index, weights, pool, extra, later = top_k_index, top_k_weights, needed, None, []
        if self.fallback is not None:
            missing = {e for e in needed if not cache.is_ready((layer, e))}
            if missing:
                resident = cache.ready_experts(layer)
                plan = self.fallback.plan(
                    layer, hidden_states, index, weights, needed, missing, resident, module.act_fn
                )
                index, weights, pool, extra = plan.index, plan.weights, plan.pool, plan.extra
                cache.stats.substituted += plan.substituted
                cache.stats.gated_fetches += len(missing.intersection(pool))
                later = sorted(missing.difference(pool))  # copied in the background, for the next tokens
        referenced = len(index.unique()) if index is not top_k_index else len(needed)
        if len(pool) > cache.num_slots:
            cache.stats.waves += 1  # more distinct experts than slots (long prefill, big batch): stream in waves
        out = None
        for i in range(0, len(pool), cache.num_slots):
            wave = pool[i : i + cache.num_slots]
            table, lo, hi = cache.acquire(layer, wave)
            if i == 0:
                self._look_ahead(pool, later)
            masked = len(wave) < referenced  # routed pairs outside the wave go to the sentinel id with weight 0
            part = self._on_pool(module, forward, hidden_states, table[index], weights, lo, hi, masked, args, kwargs)
            cache.release(layer, wave)
            out = part if out is None else out + part
        if out is None:  # every routed pair was served by the fallback: nothing ran on the pool
            self._look_ahead(pool, later)
            out = torch.zeros_like(hidden_states)
        return out if extra is None else out + extra

    def _look_ahead(self, pool: list[int], later: list[int]) -> None:
        """After the demand copies: queue the next layers' predicted experts, then this layer's substituted ones."""
        protected = {(self.layer, e) for e in pool}
        if self.prefetcher is not None:
            self.prefetcher.run(self.layer, protected)
        for e in later:  # only into idle link time: when the link is the bottleneck, these copies would cost speed
            if self.cache.engine.queued() > 0 or self.cache.load((self.layer, e), protected, speculative=True) is None:
                break

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
        options: Options,
        standin_bytes: int,
    ):
        self.model, self.blocks, self.cache, self.engine = model, blocks, cache, engine
        self.budget_bytes, self.options, self.standin_bytes = budget_bytes, options, standin_bytes
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
            "resident_bytes": self.cache.resident_bytes + self.standin_bytes,
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
            "prefetch": self.options.prefetch,
            "fallback": self.options.fallback,
            "prefetch_recall": s.hits / needed if needed else 0.0,  # needed experts resident or in flight
            "prefetches": s.prefetches,
            "prefetch_precision": s.prefetches_used / s.prefetches if s.prefetches else 0.0,
            "substituted": s.substituted,
            "gated_fetches": s.gated_fetches,
            "standin_bytes": self.standin_bytes,
            "per_layer": [
                {
                    "layer": i,
                    "name": b.name,
                    "hits": s.layer_hits[i],
                    "misses": s.layer_misses[i],
                    "prefetch_recall": s.layer_hits[i] / max(1, s.layer_hits[i] + s.layer_misses[i]),
                }
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
    prefetch: str | None = "lookahead",
    lookahead_depth: int = 1,
    prefetch_candidates: int = 1,
    critical_weight: float = 0.5,
    standin_fraction: float = 0.1,
    calibration: str | Path | None = None,
    link: EmulatedLink | None = None,
    pin_memory: bool = True,
    compile: bool = False,
) -> OffloadHandle:
    """Keep only `budget` of `model`'s expert weights on `device`; every other weight goes to `device`.

    budget: a fraction of all experts' bytes in (0, 1], or a size such as "6GiB"; it must hold at least one layer's
        top-k experts. Everything expert-related on the device counts: the slot pool and any stand-ins.
    eviction: "lru" (default), "lfu", or "layer" (evict the expert whose layer runs furthest ahead: better than LRU
        when the pool is smaller than one token's working set, worse above it; see the README's measurements).
    fallback: on a prefetch miss, "fetch" (wait for the copy: outputs equal the unpatched model's), "drop",
        "buddy" or "lowrank" (see offload_moe.fallbacks). critical_weight: misses with at least this routing weight
        are fetched whatever the fallback.
    prefetch: "lookahead" applies the next `lookahead_depth` layers' routers to the current hidden state and copies
        their `prefetch_candidates` most likely experts early; None turns it off.
    standin_fraction: "lowrank" stand-ins take this fraction of all experts' bytes, and at most 40% of the budget.
    calibration: a file from `offload_moe.calibrate` (activation-aware stand-ins, buddy lists, thresholds).
    link: emulate a slower host-to-device link (CPU-only measurements; results are then emulated).
    pin_memory: on CUDA, keep host copies of the experts in pinned memory (asynchronous copies).
    compile: torch.compile the attention modules (the dense compute); the residency logic and the experts kernels
        (data-dependent shapes) stay eager. Outputs match eager mode.
    """
    options = Options(
        eviction, fallback, prefetch, lookahead_depth, prefetch_candidates, critical_weight, standin_fraction,
        calibration, link, pin_memory, compile,
    )  # fmt: skip
    return _patch(model, budget, device, options, store=None)


def _patch(
    model: torch.nn.Module,
    budget: float | str,
    device: str | torch.device | None,
    opt: Options,
    store: HostStore | None,
) -> OffloadHandle:
    """`patch`, optionally with a ready host store (from `load`, whose experts are not in the model at all)."""
    if hasattr(model, _HANDLE_ATTR):
        raise RuntimeError("this model is already patched; call handle.unpatch() before patching it again")
    if opt.fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {opt.fallback!r}; choose one of {list(FALLBACKS)}")
    if opt.prefetch not in PREFETCHERS:
        raise ValueError(f"unknown prefetch {opt.prefetch!r}; choose 'lookahead' or None")
    if not 0 < opt.standin_fraction < 1:
        raise ValueError(f"standin_fraction must be in (0, 1), got {opt.standin_fraction}")
    dev = resolve_device(device)
    policy = make_eviction(opt.eviction)
    if opt.link is not None and not isinstance(opt.link, EmulatedLink):
        raise TypeError(f"link must be an offload_moe.EmulatedLink or None, got {type(opt.link).__name__}")
    blocks = find_moe_blocks(model)
    names = blocks[0].expert_param_names()
    originals = [{n: getattr(b.experts, n) for n in b.expert_param_names()} for b in blocks]
    if any(list(o) != names for o in originals):
        raise ValueError("MoE layers have different expert parameter names; offload-moe needs one layout")
    dtype = originals[0][names[0]].dtype
    calib = load_calibration(opt.calibration) if opt.calibration is not None else None
    if calib is not None:
        _check_calibration(calib.meta, blocks)

    n_exp = blocks[0].num_experts
    total_experts = len(blocks) * n_exp
    shapes = {n: tuple(p.shape[1:]) for n, p in originals[0].items()}
    itemsize = originals[0][names[0]].element_size()
    expert_bytes = sum(torch.Size(sh).numel() for sh in shapes.values()) * itemsize
    budget_b = budget_bytes(budget, total_experts * expert_bytes)
    rank = 0
    if opt.fallback == "lowrank":
        if set(names) != {"gate_up_proj", "down_proj"}:
            raise ValueError(
                f"fallback='lowrank' needs gated experts (gate_up_proj, down_proj), this model has {names}"
            )
        share = min(opt.standin_fraction, STANDIN_BUDGET_SHARE * budget_b / (total_experts * expert_bytes))
        rank = rank_for_fraction(share, shapes)
        if calib is not None:
            rank = min(rank, calib.standins.rank)
        if rank < 1:
            raise ValueError(f"budget {format_bytes(budget_b)} leaves no room for rank-1 stand-ins; raise the budget")
    standin_bytes = total_experts * rank * sum(a + b for a, b in shapes.values()) * itemsize
    top_k = max(b.top_k for b in blocks)
    num_slots = min((budget_b - standin_bytes) // expert_bytes, total_experts)
    if num_slots < top_k:
        raise ValueError(
            f"budget {format_bytes(budget_b)} holds {num_slots} expert(s) of {format_bytes(expert_bytes)}"
            + (f" besides {format_bytes(standin_bytes)} of stand-ins" if standin_bytes else "")
            + f", but one layer routes each token to {top_k}; raise the budget to at least "
            f"{format_bytes(top_k * expert_bytes + standin_bytes)} "
            f"(a fraction of at least {(top_k * expert_bytes + standin_bytes) / (total_experts * expert_bytes):.4f})"
        )

    orig_devices = [{n: p.device for n, p in o.items()} for o in originals]
    orig_num_experts = [b.experts.num_experts for b in blocks]
    orig_model_device = _first_non_expert_device(model, originals)
    from_checkpoint = store is not None
    engine = TransferEngine(dev, opt.link)
    attached: list[MoEBlock] = []
    prefetcher: LookaheadPrefetcher | None = None
    compiled: list[torch.nn.Module] = []
    recompile_limit = torch._dynamo.config.recompile_limit

    def restore() -> None:
        engine.shutdown()
        for m in compiled:
            m._compiled_call_impl = None  # what nn.Module.compile set
        torch._dynamo.config.recompile_limit = recompile_limit
        if prefetcher is not None:
            prefetcher.remove()
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
                    if opt.pin_memory and dev.type == "cuda" and not p.data.is_pinned():
                        p.data = p.data.pin_memory()
            store = HostStore.from_fused([{n: p.data for n, p in o.items()} for o in originals])
        fallback = _make_fallback(opt, calib, blocks, store, rank, dev, dtype)
        cache = ExpertCache(store, num_slots, dev, dtype, engine, policy)
        pool = {n: torch.nn.Parameter(t, requires_grad=False) for n, t in cache.pool.items()}
        for b in blocks:
            for n in names:
                setattr(b.experts, n, pool[n])
            b.experts.num_experts = num_slots
        model.to(dev)  # non-expert weights; the host store is no longer referenced by the model
        if opt.prefetch == "lookahead" and not cache.all_resident:
            prefetcher = LookaheadPrefetcher(blocks, cache, opt.lookahead_depth, opt.prefetch_candidates)
        for b in blocks:
            attach(b.experts, ExpertsHook(b.index, cache, names, fallback, prefetcher))
            attached.append(b)
        cache.warm(_warm_order(blocks, calib, num_slots == total_experts))
        if opt.compile:
            compiled.extend(m for n, m in model.named_modules() if n.endswith("self_attn"))
            # every layer's attention shares one code object and specialises on its layer index: one entry per
            # layer and shape class, so the default limit of 8 would send deep models back to eager
            torch._dynamo.config.recompile_limit = max(recompile_limit, 4 * len(compiled))
            for m in compiled:
                m.compile(dynamic=True)
    except BaseException:
        restore()
        raise
    handle = OffloadHandle(model, blocks, cache, engine, budget_b, restore, opt, standin_bytes)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def _warm_order(blocks: list[MoEBlock], calib, layer_major: bool) -> list[tuple[int, int]]:
    """Which experts fill the pool first: the calibration's most frequent; else spread evenly over layers (layer by
    layer when everything fits, so each layer's experts sit in consecutive slots)."""
    n_exp = blocks[0].num_experts
    if layer_major:
        return [(b.index, e) for b in blocks for e in range(n_exp)]
    if calib is not None:
        order = calib.frequencies.flatten().argsort(descending=True).tolist()
        return [(i // n_exp, i % n_exp) for i in order]
    return [(b.index, e) for e in range(n_exp) for b in blocks]


def _make_fallback(opt: Options, calib, blocks, store, rank, dev, dtype) -> MissFallback | None:
    if opt.fallback == "fetch":
        return None
    if opt.fallback == "drop":
        return Drop(opt.critical_weight)
    if opt.fallback == "lowrank":
        if calib is not None:  # activation-aware factors, truncated to the rank the budget allows
            u = {n: t[..., :rank] for n, t in calib.standins.u.items()}
            v = {n: t[:, :, :rank] for n, t in calib.standins.v.items()}
        else:  # weight-only truncated SVD, expert by expert
            factors = [[{n: lowrank(w, rank) for n, w in expert_weights(b, store, b.index, e).items()}
                        for e in range(b.num_experts)] for b in blocks]  # fmt: skip
            u = {n: torch.stack([torch.stack([f[n][0] for f in layer]) for layer in factors]) for n in store.names}
            v = {n: torch.stack([torch.stack([f[n][1] for f in layer]) for layer in factors]) for n in store.names}
        return LowRank(opt.critical_weight, StandIns(u, v).to(dev, dtype))
    if calib is None:
        raise ValueError("fallback='buddy' needs buddy lists: pass calibration=offload_moe.calibrate(...) output")
    return Buddy(opt.critical_weight, calib.buddies, calib.tau)


def _check_calibration(meta: dict, blocks: list[MoEBlock]) -> None:
    got = (len(blocks), blocks[0].num_experts, blocks[0].experts.gate_up_proj.shape[-1])
    want = (meta.get("layers"), meta.get("experts"), meta.get("hidden"))
    if got != want:
        raise ValueError(
            f"calibration was made for a {meta.get('model')} with (layers, experts, hidden) = {want}, "
            f"but this model has {got}; calibrate this model"
        )


def _first_non_expert_device(
    model: torch.nn.Module, originals: list[dict[str, torch.nn.Parameter]]
) -> torch.device | None:
    expert_ids = {id(p) for o in originals for p in o.values()}
    return next((p.device for p in model.parameters() if id(p) not in expert_ids), None)
