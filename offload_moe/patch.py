"""`patch(model, budget, device, **options)`: make a transformers MoE model run with only a budget of its experts on
the compute device. The model surgery is a stack of steps, each registered with its undo as it is taken, so a
failure midway and `unpatch()` both restore the model exactly."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from hooks import MoEBlock, attach, detach
from offload_moe import compat
from offload_moe.blocks import expert_geometry, moe_blocks
from offload_moe.budget import format_bytes
from offload_moe.calibration import Calibration, load_calibration
from offload_moe.errors import BudgetError
from offload_moe.handle import OffloadHandle, handle_of
from offload_moe.options import OffloadOptions
from offload_moe.plan import Plan, make_plan
from offload_moe.runtime.cache import ExpertCache
from offload_moe.runtime.counters import Counters, FixedHits
from offload_moe.runtime.hook import ExpertsHook
from offload_moe.runtime.host import HostCompute
from offload_moe.runtime.miss import StandinPolicy
from offload_moe.runtime.prefetch import LookaheadPrefetcher
from offload_moe.runtime.process import storage_read_bytes
from offload_moe.runtime.store import HostStore
from offload_moe.runtime.transfer import CHUNK_BYTES, TransferEngine
from offload_moe.sizing import AUTO, device_room, free_for_experts
from offload_moe.standins.kinds import KINDS, BuildContext


def patch(
    model: torch.nn.Module,
    budget: float | str = "auto",
    device: str | torch.device | None = None,
    *,
    options: OffloadOptions | None = None,
    **kwargs: Any,
) -> OffloadHandle:
    """Keep only `budget` of `model`'s expert weights on `device`; every other weight goes to `device`.

    budget: a fraction of all experts' bytes in (0, 1], a size such as "6GiB", or "auto" (the default): what the
        device has free, less the model's other weights, the KV cache for `max_tokens` x `max_batch` and
        `memory_margin` (every expert, when they fit). It must hold at least one layer's top-k experts. Everything
        expert-related on the device counts: the slot pool and any stand-ins. Why "auto" is the default: decode
        speed only grows with the budget (a miss costs a copy or a host job; the benches' budget rows), so the
        largest budget that fits is the fastest one, and a larger one fails.
    device: "cuda" (default when present), "cuda:N" or "cpu".
    options / kwargs: an `OffloadOptions`, and/or its fields as keywords (eviction, miss_path, prefetch, ...;
        docs/options.md lists them).
    """
    return offload(model, budget, device, OffloadOptions.of(options, **kwargs))


def offload(
    model: torch.nn.Module,
    budget: float | str,
    device: str | torch.device | None,
    options: OffloadOptions,
    store: HostStore | None = None,
    read_base: int | None = None,
) -> OffloadHandle:
    """`patch` with validated options; `store`: the experts' host copies when they are not in the model (`load`);
    read_base: `storage_read_bytes()` when the work began (`load`: before opening the checkpoint; default: now)."""
    if handle_of(model) is not None:
        raise RuntimeError("this model is already patched; call handle.unpatch() before patching it again")
    read_base = storage_read_bytes() if read_base is None else read_base
    dev = resolve_device(device)
    blocks = moe_blocks(model)
    names = blocks[0].expert_param_names()
    calib = load_calibration(options.calibration) if options.calibration is not None else None
    if calib is not None:
        calib.check_fits(blocks)
    geometry = expert_geometry(blocks, store.expert_bytes() if store is not None and store.packed else None)
    dtype = getattr(blocks[0].experts, names[0]).dtype
    room = device_room(model, blocks, geometry, dev, options, dtype) if budget == AUTO else None
    budget = str(room.experts) if room is not None else budget
    plan = make_plan(geometry, budget, options, calib.catalog() if calib is not None else None)
    _check_fits_device(plan, blocks, dev)
    undo = ExitStack()
    try:
        if store is None:
            store = _host_store(blocks, names, dev, options, undo)
        else:
            undo.callback(_materialize, blocks, store, dtype)  # unpatch: experts from the checkpoint, as loaded
        engine = TransferEngine(dev, options.link_pace(), options.chunk_bytes or CHUNK_BYTES)
        undo.callback(engine.shutdown)
        workers = [engine.shutdown]
        counters = Counters(len(blocks))
        frozen = options.placement != "dynamic" and not plan.all_resident  # static: what warm() puts there stays
        miss_path = options.miss_setup(dev.type)
        cache = ExpertCache(
            store,
            plan.slots,
            dev,
            dtype,
            engine,
            options.eviction,
            counters,
            geometry.top_k,
            frozen,
            admission=miss_path.uses_host,
        )
        fixed_hits = FixedHits(counters, store.num_experts, dev)
        home = _non_expert_device(model, blocks)
        if home is not None and home != dev:
            undo.callback(model.to, home)  # runs after the experts are restored: they go home too
        _swap_in_pool(blocks, names, cache, undo)
        model.to(dev)  # non-expert weights; the experts modules now hold only the pool
        prefetcher = _prefetcher(blocks, cache, options, undo) if not plan.all_resident else None
        standin = _standin(options, calib, blocks, store, engine, counters, plan, dev, dtype)
        host = None
        if miss_path.uses_host and not plan.all_resident:
            experts = [b.experts for b in blocks]
            host = HostCompute(
                store,
                experts,
                names,
                _hidden_size(model),
                dev,
                counters,
                options.host_pace(),
                threads=options.host_threads,
                precision=options.host_precision,
            )
            undo.callback(host.shutdown)
            workers.append(host.shutdown)
        router = miss_path.router(engine, host, counters)
        counters.reset()  # the micro-benchmark's jobs are not the model's
        cache.warm(_warm_order(blocks, calib, plan.all_resident, options.placement))  # measures the link
        _hold_fixed_slots(blocks, names, cache)
        for b in blocks:
            hook = ExpertsHook(b.index, cache, names, router, standin, prefetcher, host, counters, fixed_hits)
            attach(b.experts, hook)
            undo.callback(detach, b.experts)
        if options.compile:
            _compile(model, None if options.compile is True else options.compile, undo)
    except BaseException:
        undo.close()
        raise
    return OffloadHandle(
        model, blocks, cache, plan, options, undo, miss_path.name, counters, fixed_hits, workers, read_base, host
    )


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


def _check_fits_device(plan: Plan, blocks: list[MoEBlock], device: torch.device) -> None:
    """Refuse, before any work, a plan whose expert slots and stand-ins need more of `device` than is free there."""
    free = free_for_experts(blocks, device)
    if free is not None and plan.device_expert_bytes > free:
        raise BudgetError(
            f"budget {format_bytes(plan.budget_bytes)} needs {format_bytes(plan.device_expert_bytes)} on {device} for "
            f"its expert slots and stand-ins, but {format_bytes(free)} is free there; lower the budget (a size such "
            f"as budget='{free * 0.9 / 2**30:.1f}GiB' leaves a margin) or free memory on the device"
        )


def _host_store(
    blocks: list[MoEBlock], names: list[str], dev: torch.device, options: OffloadOptions, undo: ExitStack
) -> HostStore:
    """Expert weights on an accelerator move to CPU memory (pinned for CUDA copies), in place; undone at unpatch."""
    pin = dev.type == "cuda" if options.pin_memory is None else options.pin_memory and dev.type == "cuda"
    weights = []
    for b in blocks:
        layer = {}
        for n in names:
            p = getattr(b.experts, n)
            home = p.device
            undo.callback(_move_data, p, home)
            if p.device.type != "cpu":
                p.data = p.data.to("cpu")
            if pin and not p.data.is_pinned():
                p.data = p.data.pin_memory()
            layer[n] = p.data
        weights.append(layer)
    return HostStore.from_fused(weights)


def _move_data(p: torch.nn.Parameter, device: torch.device) -> None:
    if p.device != device:
        p.data = p.data.to(device)


def _materialize(blocks: list[MoEBlock], store: HostStore, dtype: torch.dtype) -> None:
    """Give a `load`ed model its experts from the checkpoint (read in full: only at unpatch)."""
    for b in blocks:
        for name, t in store.materialize(b.index, dtype).items():
            setattr(b.experts, name, torch.nn.Parameter(t, requires_grad=False))


def _swap_in_pool(blocks: list[MoEBlock], names: list[str], cache: ExpertCache, undo: ExitStack) -> None:
    """Every layer's experts module points at the shared slot pool; the originals go back at unpatch."""
    pool = {n: torch.nn.Parameter(t, requires_grad=False) for n, t in cache.kernel_weights().items()}
    for b in blocks:
        originals, num_experts = compat.swap_parameters(b.experts, pool), b.experts.num_experts
        undo.callback(_restore_experts, b.experts, originals, num_experts)
        b.experts.num_experts = cache.num_slots


def _hold_fixed_slots(blocks: list[MoEBlock], names: list[str], cache: ExpertCache) -> None:
    """A layer that never misses holds its own slots of the pool as its parameters, as unpatched: its experts run
    through the stock forward with no swap and no remap (one compiled graph can cover it). `_swap_in_pool`'s undo
    restores the originals."""
    for b in blocks:
        slots = cache.fixed_slots(b.index)
        if slots is not None:
            views = {n: torch.nn.Parameter(cache.pool[n][slots], requires_grad=False) for n in names}
            compat.swap_parameters(b.experts, views)
            b.experts.num_experts = slots.stop - slots.start


def _restore_experts(module: torch.nn.Module, params: dict[str, torch.nn.Parameter], num_experts: int) -> None:
    compat.swap_parameters(module, params)
    module.num_experts = num_experts


def _non_expert_device(model: torch.nn.Module, blocks: list[MoEBlock]) -> torch.device | None:
    expert_ids = {id(p) for b in blocks for p in compat.parameters(b.experts).values()}
    return next((p.device for p in model.parameters() if id(p) not in expert_ids), None)


def _prefetcher(
    blocks: list[MoEBlock], cache: ExpertCache, options: OffloadOptions, undo: ExitStack
) -> LookaheadPrefetcher | None:
    if options.prefetch != "lookahead":
        return None
    prefetcher = LookaheadPrefetcher(blocks, cache, options.lookahead_depth, options.prefetch_candidates)
    undo.callback(prefetcher.remove)
    return prefetcher


def _hidden_size(model: torch.nn.Module) -> int:
    """The width of the residual stream the experts read (the text model's, in a multimodal one)."""
    return int(model.config.get_text_config().hidden_size)


def _standin(
    options: OffloadOptions,
    calib: Calibration | None,
    blocks: list[MoEBlock],
    store: HostStore,
    engine: TransferEngine,
    counters: Counters,
    plan: Plan,
    dev: torch.device,
    dtype: torch.dtype,
) -> StandinPolicy | None:
    if options.standin is None:
        return None
    ctx = BuildContext(options, calib, blocks, store, plan.sizing, engine, counters, dev, dtype)
    return KINDS[options.standin].build(ctx)


def _warm_order(
    blocks: list[MoEBlock], calib: Calibration | None, layer_major: bool, placement: str
) -> list[tuple[int, int]]:
    """Which experts fill the pool first: "static-layers", whole layers from the last one back (llama.cpp keeps the
    first layers' experts on the host); else the calibration's most frequent; else spread evenly over layers (layer by
    layer when everything fits, so each layer's experts sit in consecutive slots)."""
    n_exp = blocks[0].num_experts
    if layer_major:
        return [(b.index, e) for b in blocks for e in range(n_exp)]
    if placement == "static-layers":
        return [(b.index, e) for b in reversed(blocks) for e in range(n_exp)]
    if calib is not None:
        order = calib.frequencies.flatten().argsort(descending=True).tolist()
        return [(i // n_exp, i % n_exp) for i in order]
    return [(b.index, e) for e in range(n_exp) for b in blocks]


def _compile(model: torch.nn.Module, mode: str | None, undo: ExitStack) -> None:
    """torch.compile the model's forward as one graph: a layer that never misses is traced whole (attention, norms,
    router, experts kernel); a layer that may miss enters it as one opaque op (`offloaded_experts`), so the graph
    does not break there. Calls under continuous batching run eager: transformers keeps paged attention out of
    graphs, so every layer would break the graph (slower than eager). No process-wide dynamo setting changes."""
    had = model.__dict__.get("forward")
    eager = model.forward

    def entry(*args: Any, **kwargs: Any) -> Any:
        return eager(*args, **kwargs)

    # its own code object, so its own dynamo cache: other compiles of this class do not count against its limit
    compiled = torch.compile(compat.own_code(entry), mode=mode)

    @functools.wraps(eager)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return (eager if compat.is_paged_cache(kwargs.get("cache")) else compiled)(*args, **kwargs)

    model.forward = forward
    undo.callback(_restore_forward, model, had)


def _restore_forward(model: torch.nn.Module, had: Callable | None) -> None:
    del model.forward
    if had is not None:
        model.forward = had
