"""`offload_moe.fit(path_or_model, ...)`: what `load` or `patch` would put where, and the decode speed to expect,
before anything is loaded (llama.cpp's `--fit` table). The placement is the plan `patch` makes; the speed is
estimated from probes run now on this machine (a copy of one expert over the link, one expert computed on the host
for one token, one expert read from the checkpoint's file past the page cache) and the hit rate the routing allows
(a calibration file's routing trace replayed through the cache, else its expert frequencies, else every expert
equally likely).

    python -m offload_moe fit PATH [--budget auto] [--device cpu] [--ram-budget auto] [--calibration FILE]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from offload_moe.blocks import expert_geometry, moe_blocks
from offload_moe.budget import format_bytes
from offload_moe.calibration import Calibration, load_calibration
from offload_moe.geometry import ExpertGeometry
from offload_moe.load import expert_spans, shard_names
from offload_moe.options import OffloadOptions
from offload_moe.patch import offload, resolve_device
from offload_moe.plan import make_plan
from offload_moe.routing_replay import replay
from offload_moe.runtime.disk import FileSpan
from offload_moe.runtime.store import mmap_safetensors
from offload_moe.sizing import AUTO, DeviceRoom, device_room, kv_cache_bytes, non_expert_bytes, ram_tier_slots

PROBE_REPEATS = 5  # each probe's time is the median of this many runs
DISK_PROBES = 16  # experts the disk probe reads (their median)
EXPERT_PROBES = ("copy", "host", "disk")  # the probes timed per expert (the plan's "runtime call" is per call)
DECODE_STEPS = 16  # a decode step's time is the median of this many (a step is short, and this machine noisy)
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # config names of the routed expert count
WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size")  # config names of the experts' widths
IDLE_WIDTH = 64  # their width in `_idle_experts_seconds` (what an idle expert costs a kernel barely depends on it)
GROUPS = ("n_group", "topk_group", "num_expert_groups")  # group-limited routing: one group once experts are cut


@dataclass(frozen=True)
class FitPlan:
    """Where the experts go and what decode speed to expect. Bytes are as stored (a low-bit checkpoint's packed)."""

    source: str
    device: str
    layers: int
    experts: int
    top_k: int
    expert_bytes: int
    other_bytes: int  # the model's other weights (on the device)
    kv_bytes: int  # KV cache for max_tokens x max_batch
    room: DeviceRoom | None  # budget="auto": what the device budget was computed from
    device_experts: int  # expert slots on the device
    ram_experts: int  # experts kept in RAM: a RAM tier (load), or every expert's host copy (patch)
    disk_experts: int  # experts read from the checkpoint's files on a miss
    hit_rate: float  # expected share of expert uses found resident
    hit_rate_source: str  # "calibration trace" (replayed through the cache), "calibration" (frequencies) or "uniform"
    misses_per_token: float
    missing_calls_per_token: float  # MoE layer calls that miss at least one expert
    miss_path: str
    probes: dict[str, float]  # seconds: "copy" (one expert over the link), "host" (one expert, one token), "disk";
    # "runtime call": what the runtime adds to a layer call with misses beyond their transfers (timed on a skeleton)
    miss_seconds: float  # expected seconds per miss on `miss_path`: its transfer or host compute
    call_seconds: float  # expected seconds a layer call with misses adds beyond them (0: not timed)
    step_seconds: float  # one decode step with every routed expert resident
    step_source: str  # "measured" (the model ran here), "skeleton" (timed on 1- and 3-layer builds) or "bandwidth"

    @property
    def decode_tokens_per_s(self) -> float:
        calls = self.missing_calls_per_token * self.call_seconds
        return 1.0 / (self.step_seconds + calls + self.misses_per_token * self.miss_seconds)

    def as_dict(self) -> dict[str, Any]:
        room = None if self.room is None else self.room.__dict__
        return {**self.__dict__, "room": room, "decode_tokens_per_s": self.decode_tokens_per_s}

    def __str__(self) -> str:
        e, total = self.expert_bytes, self.layers * self.experts
        rows = [
            ("device", f"{self.device_experts} of {total} experts", self.device_experts * e),
            ("device", "other weights", self.other_bytes),
            ("device", "KV cache", self.kv_bytes),
            ("RAM", f"{self.ram_experts} experts", self.ram_experts * e),
            ("disk", f"{self.disk_experts} experts", self.disk_experts * e),
        ]
        lines = [
            f"offload_moe fit: {self.source}: {self.layers} MoE layers x {self.experts} experts, top-{self.top_k}, "
            f"{format_bytes(e)} per expert",
        ]
        if self.room is not None:
            lines.append(f"budget auto: {self.room.describe()}")
        lines += [f"  {'where':<8}{'what':<28}{'bytes':>12}"]
        lines += [f"  {w:<8}{what:<28}{format_bytes(b):>12}" for w, what, b in rows]
        p = self.probes
        lines += [
            f"expected hit rate {self.hit_rate:.2f} ({self.hit_rate_source}), {self.misses_per_token:.1f} misses per "
            f"token in {self.missing_calls_per_token:.1f} of its {self.layers} MoE layer calls, miss_path "
            f"{self.miss_path}: {self.miss_seconds * 1e3:.3f} ms per miss, {self.call_seconds * 1e3:.3f} ms per call",
            "probes: " + ", ".join(f"{k} {p[k] * 1e3:.3f} ms" for k in EXPERT_PROBES if k in p) + " per expert",
            f"estimate: {self.decode_tokens_per_s:.1f} tokens/s decode (a step with every expert resident "
            f"{self.step_seconds * 1e3:.2f} ms, {self.step_source})",
        ]
        return "\n".join(lines)


def fit(
    source: str | Path | torch.nn.Module,
    budget: float | str = AUTO,
    device: str | torch.device | None = None,
    *,
    ram_budget: float | str | None = None,
    options: OffloadOptions | None = None,
    **kwargs: Any,
) -> FitPlan:
    """The plan `load(source, budget, device, ram_budget=...)` (a checkpoint directory) or `patch(source, budget,
    device)` (a model in memory) would make, with a decode estimate; reads no expert weights but the probe's one."""
    opt = OffloadOptions.of(options, **kwargs)
    dev = resolve_device(device)
    if isinstance(source, torch.nn.Module):
        model, path, name = source, None, type(source).__name__
    else:
        path = Path(source)
        model, name = _meta_model(path), str(path)
    blocks = moe_blocks(model)
    files = _expert_files(path, blocks) if path is not None else None
    packed = files["expert_bytes"] if files is not None else None
    geometry = expert_geometry(blocks, packed)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    other = files["other_bytes"] if files is not None else non_expert_bytes(model, blocks)
    room = device_room(model, blocks, geometry, dev, opt, dtype) if budget == AUTO else None
    budget = str(room.experts) if room is not None else budget
    plan = make_plan(geometry, budget, opt)
    total = geometry.total_experts
    ram = total if path is None else _ram_experts(ram_budget, geometry, dev, opt, plan.slots)
    disk = 0 if path is None else max(0, total - plan.slots - ram)
    calib = load_calibration(opt.calibration) if opt.calibration is not None else None
    routing = _routing(plan.slots, geometry, calib, opt)
    probes = _probes(geometry, dev, path, blocks, dtype)
    miss_path = opt.miss_setup(dev.type).name
    timed = _timings(
        model, path is None, dev, blocks[0].experts, geometry, dtype, opt, _miss_seconds(miss_path, probes, 0.0)
    )
    miss_s = _miss_seconds(miss_path, probes, _disk_share(ram, disk))
    if timed.call is not None:
        probes["runtime call"] = timed.call
    step, step_source = timed.step, timed.source
    if step is None:
        step = (
            (other + geometry.layers * geometry.top_k * geometry.expert_bytes) / geometry.expert_bytes * probes["host"]
        )
    return FitPlan(
        name, str(dev), geometry.layers, geometry.experts, geometry.top_k, geometry.expert_bytes, other,
        kv_cache_bytes(model.config, dtype, opt.max_tokens, opt.max_batch), room, plan.slots,
        ram, disk, routing.hit_rate, routing.source, routing.misses, routing.missing_calls, miss_path,
        probes, miss_s, timed.call or 0.0, step, step_source,
    )  # fmt: skip


def _meta_model(path: Path) -> torch.nn.Module:
    """The checkpoint's model on the meta device (no weights): its blocks, shapes and config."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.bfloat16)


def _expert_files(path: Path, blocks: list) -> dict[str, int]:
    """Bytes of one expert as stored and of everything else, from the shards' memory maps (no weights read)."""
    expert_total, other = 0, 0
    for shard in shard_names(path):
        for key, t in mmap_safetensors(path / shard).items():
            if ".experts." in key:  # a shared expert's keys read "shared_experts."
                expert_total += t.nbytes
            else:
                other += t.nbytes
    return {"expert_bytes": expert_total // (len(blocks) * blocks[0].num_experts), "other_bytes": other}


def _ram_experts(ram_budget, g: ExpertGeometry, dev: torch.device, opt: OffloadOptions, slots: int) -> int:
    """Experts `load` keeps in a RAM tier besides the device's `slots`."""
    if ram_budget is None:
        return 0
    tier = ram_tier_slots(ram_budget, g.expert_bytes, g.total_bytes, dev, opt.margin_bytes())
    return min(tier, g.total_experts - slots)


@dataclass(frozen=True)
class _Routing:
    """Per decode token: the expected share of expert uses resident, the misses and the layer calls with one."""

    hit_rate: float
    misses: float
    missing_calls: float
    source: str  # "calibration trace" (replayed through the cache), "calibration" (frequencies) or "uniform"


def _routing(slots: int, g: ExpertGeometry, calib: Calibration | None, opt: OffloadOptions) -> _Routing:
    """What the routing leaves missing at `slots`: the calibration's routing trace replayed through the cache, else
    its expert frequencies, else every expert equally likely (the last two with calls missing independently)."""
    if calib is not None and calib.routing is not None and opt.placement == "dynamic" and slots < g.total_experts:
        r = replay(calib.routing, slots, g.experts, g.top_k, opt.eviction)
        return _Routing(r.hit_rate, r.misses, r.missing_calls, "calibration trace")
    hit, source = _top_share(slots, g, calib.frequencies if calib is not None else None)
    return _Routing(hit, g.layers * g.top_k * (1 - hit), g.layers * (1 - hit**g.top_k), source)


def _top_share(slots: int, g: ExpertGeometry, frequencies: torch.Tensor | None) -> tuple[float, str]:
    """Share of expert uses resident when each layer holds its share of the slots (fractional: the pool is shared),
    its most used experts (a static placement by frequency holds these; LRU holds fewer)."""
    per_layer = min(float(g.experts), slots / g.layers)
    if frequencies is None:
        return per_layer / g.experts, "uniform"
    f = frequencies.float() / frequencies.float().sum(dim=1, keepdim=True).clamp_min(1e-12)  # [L, E]
    top = f.sort(dim=1, descending=True).values.cumsum(dim=1)  # [L, E] mass of the k most used
    whole = int(per_layer)
    below = top[:, whole - 1] if whole > 0 else torch.zeros(g.layers)
    nxt = top[:, whole] - below if whole < g.experts else torch.zeros(g.layers)
    return float((below + (per_layer - whole) * nxt).mean()), "calibration"


def _miss_seconds(miss_path: str, probes: dict[str, float], disk_share: float) -> float:
    """Seconds per miss on `miss_path`: its copy (a `disk_share` of misses read from disk first) or its host compute
    ("auto": the cheaper)."""
    copy_s = probes["copy"] + disk_share * probes.get("disk", 0.0)
    return {"fetch": copy_s, "host": probes["host"]}.get(miss_path, min(copy_s, probes["host"]))


def _disk_share(ram: int, disk: int) -> float:
    """Share of misses read from disk: the experts outside the device that the RAM tier does not hold."""
    return disk / (ram + disk) if ram + disk else 0.0


def _probes(
    g: ExpertGeometry, dev: torch.device, path: Path | None, blocks: list, dtype: torch.dtype
) -> dict[str, float]:
    """Seconds per expert: a copy to `dev` (pinned source on CUDA), the host computing it for one token, and (a
    checkpoint at `path`) reading it from its files past the page cache, as `load` reads it."""
    nbytes = g.expert_bytes
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    out = {"copy": _median(lambda: dst.copy_(src, non_blocking=False), dev)}
    weights = [torch.randn(s, dtype=torch.bfloat16) for s in g.shapes.values() if len(s) == 2]  # [out, in] each
    x = {w.shape[1]: torch.randn(1, w.shape[1], dtype=torch.bfloat16) for w in weights}
    out["host"] = _median(lambda: [F.linear(x[w.shape[1]], w) for w in weights], torch.device("cpu"))
    if path is not None:
        with expert_spans(path, blocks, dtype) as spans:
            out["disk"] = _disk_probe([e for layer in spans for e in layer])
    return out


def _median(fn, dev: torch.device, repeats: int = PROBE_REPEATS) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _disk_probe(experts: list[list[FileSpan]]) -> float:
    """Median seconds to read an expert (its spans) past the page cache (dropped first for those bytes) through the
    runtime's own read path, over `DISK_PROBES` experts chosen at random (one expert read again would find the
    storage's own cache warm)."""
    picks = random.Random(0).sample(experts, min(DISK_PROBES, len(experts)))
    buf = torch.empty(max(s.nbytes for spans in picks for s in spans), dtype=torch.uint8)
    times = []
    for spans in picks:
        for s in spans:
            os.posix_fadvise(s.fd, s.offset, s.nbytes, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for s in spans:
            s.read_into(buf[: s.nbytes])  # drops those bytes from the page cache again after reading
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class _Timings:
    """What was timed here: one decode step with every routed expert resident (None: not timed, estimate it from
    bandwidth) and how it was timed; the seconds the runtime adds to a layer call with misses beyond their transfers
    (None: unknown)."""

    step: float | None
    source: str
    call: float | None


_NONE = _Timings(None, "bandwidth", None)  # nothing timed: estimated from bandwidth


def _timings(
    model: torch.nn.Module,
    in_memory: bool,
    dev: torch.device,
    experts: torch.nn.Module,
    g: ExpertGeometry,
    dtype: torch.dtype,
    opt: OffloadOptions,
    miss_s: float,
) -> _Timings:
    """Time skeletons built from the model's config at its widths (each layer with top-k experts: what one token
    computes) with one and with three decoder layers; the step is the one-layer time plus the per-layer difference for
    each further layer (a model in memory on this device type is timed as it is). The three-layer skeleton patched
    with every expert gives the runtime's own cost per MoE layer call (added for each of the model's MoE layers);
    patched with one layer's experts (every call misses), what a call with misses costs beyond its misses' `miss_s`
    each (their transfer or host compute from RAM): a call's bookkeeping and kernel pass on the pool, which a call
    pays whether it misses one expert or all. The skeleton's step lacks what every layer call's kernel spends on the
    experts no token is routed to (`_idle_experts_seconds`), added per MoE layer. A family whose config this cannot
    cut leaves all unknown."""
    try:
        one = _decode_seconds(_skeleton(model.config, 1, g.top_k, dtype, dev))
        three_layers = _skeleton(model.config, 3, g.top_k, dtype, dev)
        three = _decode_seconds(three_layers)
        full, _, _ = _patched_seconds(three_layers, 1.0, dev, opt)
        third, misses, calls = _patched_seconds(three_layers, 1 / 3, dev, opt)
        timed_here = _timed_here(model, in_memory, dev)  # its own step has its idle experts in it
        idle = 0.0 if timed_here else _idle_experts_seconds(model.config, type(experts), g, dtype, dev)
    except Exception:  # noqa: BLE001 - a family this cannot cut falls back to the bandwidth estimate
        return _Timings(_decode_seconds(model), "measured", None) if _timed_here(model, in_memory, dev) else _NONE
    hooks = g.layers * max(0.0, full - three) / 3  # the runtime's cost at full residency, every MoE layer
    call = max(0.0, third - full - misses * miss_s) / calls if calls else None
    if timed_here:
        return _Timings(_decode_seconds(model) + hooks, "measured", call)
    step = one + (model.config.num_hidden_layers - 1) * max(0.0, three - one) / 2 + hooks + g.layers * idle
    return _Timings(step, "skeleton", call)


def _timed_here(model: torch.nn.Module, in_memory: bool, dev: torch.device) -> bool:
    """A model in memory on the device's type: its own step is timed."""
    return in_memory and next(model.parameters()).device.type == dev.type


def _patched_seconds(
    skeleton: torch.nn.Module, budget: float, dev: torch.device, opt: OffloadOptions
) -> tuple[float, float, float]:
    """The skeleton's decode step patched at `budget`, and its misses and layer calls with misses per step (the
    prompt's not counted)."""
    handle = offload(skeleton, budget, dev, dataclasses.replace(opt, calibration=None, standin=None))
    try:
        step = _decode_seconds(skeleton, after_prompt=handle.reset_stats)
        s = handle.stats()
        return step, s.misses / (DECODE_STEPS + 1), s.missing_calls / (DECODE_STEPS + 1)
    finally:
        handle.unpatch()


def _decode_seconds(model: torch.nn.Module, after_prompt: Callable[[], object] = lambda: None) -> float:
    """Median seconds of one-token decode steps (one warm-up and DECODE_STEPS timed) after an 8-token prompt;
    `after_prompt` runs between the two."""
    dev = next(model.parameters()).device
    ids = torch.zeros(1, 8, dtype=torch.long, device=dev)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        after_prompt()
        return _median(lambda: model(input_ids=ids[:, :1], cache=cache, use_cache=True), dev, DECODE_STEPS)


def _idle_experts_seconds(
    config, experts_class: type, g: ExpertGeometry, dtype: torch.dtype, dev: torch.device
) -> float:
    """What one layer call's kernel spends on the experts no token is routed to, which a skeleton of top-k experts
    lacks (grouped_mm on a CPU visits every expert's group): the model's experts module class at IDLE_WIDTH with
    every expert, less the same with top-k, one token routed to top-k."""
    every = _experts_call_seconds(config, experts_class, g.experts, g.top_k, dtype, dev)
    return max(0.0, every - _experts_call_seconds(config, experts_class, g.top_k, g.top_k, dtype, dev))


def _experts_call_seconds(
    config, experts_class: type, count: int, top_k: int, dtype: torch.dtype, dev: torch.device
) -> float:
    """Median seconds of one call of an experts module of `count` experts at IDLE_WIDTH, one token routed to the
    first `top_k`."""
    cfg = copy.deepcopy(config)
    _set_counts(cfg, WIDTHS, IDLE_WIDTH)
    _set_counts(cfg, EXPERT_COUNTS, count)
    with torch.device(dev):
        module = experts_class(cfg).to(dtype)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)  # allocated uninitialised: garbage may hold NaNs or denormals
    x = torch.randn(1, IDLE_WIDTH, dtype=dtype, device=dev)
    index = torch.arange(top_k, device=dev)[None]  # [1, K]
    weights = torch.full((1, top_k), 1.0 / top_k, dtype=dtype, device=dev)
    with torch.no_grad():
        return _median(lambda: module(x, index, weights), dev, DECODE_STEPS)


def _set_counts(config, names: tuple[str, ...], value: int) -> None:
    """Set each of the config's integer fields `names` that it has to `value`."""
    for name in names:
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, value)


def _skeleton(config, layers: int, top_k: int, dtype: torch.dtype, dev: torch.device) -> torch.nn.Module:
    """The checkpoint's model at its widths with `layers` decoder layers of `top_k` experts each (routing limited to
    one group), random weights on `dev`."""
    cfg = copy.deepcopy(config)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == cfg.num_hidden_layers:
        cfg.layer_types = types[:layers]
    cfg.num_hidden_layers = layers
    _set_counts(cfg, EXPERT_COUNTS, top_k)
    for name in GROUPS:
        if getattr(cfg, name, None) is not None:
            setattr(cfg, name, 1)
    with torch.device(dev):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> None:
    """`python -m offload_moe fit PATH ...`: print the plan (and --json, its fields)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m offload_moe fit", description=fit.__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--budget", default=AUTO)
    ap.add_argument("--device", default=None)
    ap.add_argument("--ram-budget", default=None)
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--max-tokens", type=int, default=OffloadOptions.max_tokens)
    ap.add_argument("--max-batch", type=int, default=OffloadOptions.max_batch)
    ap.add_argument("--json", action="store_true", help="print the plan's fields as JSON")
    args = ap.parse_args(argv)
    budget = args.budget if args.budget == AUTO or not args.budget.replace(".", "").isdigit() else float(args.budget)
    try:
        plan = fit(args.path, budget, args.device, ram_budget=args.ram_budget, calibration=args.calibration,
                   max_tokens=args.max_tokens, max_batch=args.max_batch)  # fmt: skip
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad input: its message, not a traceback
        ap.error(str(e))
    print(json.dumps(plan.as_dict(), indent=1) if args.json else plan)
