"""Where a missed expert is computed: copied to the device ("fetch"), computed on the host ("host"), or whichever a
per-miss cost model says is faster ("auto").

The cost model's inputs are measured, not assumed. Host time per expert as a function of the tokens routed to it,
a + b x tokens, comes from a short micro-benchmark at patch time (cached per machine, expert shape, dtype and thread
count) and is refined online from every host job. Link time per copy is measured by the transfer engine on every
copy (warm-up included), and so is the wait for the copies already on the link. For the misses of one layer call,
most tokens first, each expert goes to whichever resource (host or link) would finish it first: a long prefill
copies, a decode token computes on the host, and both run at once when there are many misses. A copy is also an
admission to the cache: one that would evict an expert needed more often than the missed one goes to the host even
when the link is somewhat faster (`ADMIT_SLACK`), since the eviction costs a later miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from offload_moe.runtime.counters import Counters
from offload_moe.runtime.host import HostCompute
from offload_moe.runtime.transfer import TransferEngine, moving_average

# A copy that would evict an expert needed more often than the missed one goes to the host instead, unless the host
# is more than this much slower (a long prefill); the offload bench's auto rows measure what it buys (CHANGELOG).
ADMIT_SLACK = 1.25
FIT_DECAY = 0.7  # weight of the past in the host estimate's scale: a changed host is followed within a few jobs
EXPLORE_EVERY = 16  # while auto sends nothing to the host, one miss in this many layer calls goes there to be timed
BENCH_TOKENS = (1, 8, 32)  # token counts of the patch-time micro-benchmark
BENCH_REPEATS = 3


@dataclass
class HostFit:
    """Host seconds to compute one expert for n tokens: (a + b n) x scale, scale refined online."""

    a: float
    b: float
    scale: float = 1.0

    def seconds(self, tokens: int) -> float:
        return (self.a + self.b * tokens) * self.scale

    def observe(self, tokens: list[int], seconds: float) -> None:
        """A host job computed experts for these token counts in `seconds`: refine the scale."""
        predicted = sum(self.a + self.b * n for n in tokens)
        if predicted > 0:
            self.scale = FIT_DECAY * self.scale + (1 - FIT_DECAY) * seconds / predicted


def cache_dir() -> Path:
    """Where measured host costs are cached: $OFFLOAD_MOE_CACHE_DIR, else ~/.cache/offload_moe."""
    return Path(os.environ.get("OFFLOAD_MOE_CACHE_DIR") or Path.home() / ".cache" / "offload_moe")


def _cpu_name() -> str:
    try:
        return next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
    except OSError:
        return platform.processor()


def measure_host(host: HostCompute, layer: int = 0, expert: int = 0) -> HostFit:
    """Time host jobs for BENCH_TOKENS tokens (best of BENCH_REPEATS each, through the worker pool as in use) and
    fit a + b x tokens. Cached on disk per machine, expert shape, dtype, low-bit format, threads and emulation."""
    weights = host.store.expert_tensors(layer, expert)
    hidden = host.hidden_size
    dtype = next(iter(weights.values())).dtype
    shapes = sorted(host.store.expert_shapes.items())
    packed = host.store.packed.formats if host.store.packed is not None else None  # decoding is part of its cost
    key_src = json.dumps([_cpu_name(), torch.__version__, host.threads, str(dtype), shapes, packed, repr(host.pace)])
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    path = cache_dir() / "host_costs.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return HostFit(*cached[key])
    gen = torch.Generator().manual_seed(0)
    times = []
    for n in BENCH_TOKENS:
        x = torch.randn(n, hidden, generator=gen).to(dtype)
        w = torch.ones(n, dtype=dtype)
        best = float("inf")
        for _ in range(BENCH_REPEATS):
            t0 = time.perf_counter()
            host.result(host.submit(layer, [expert], x, w[:, None], np.full((n, 1), expert), False, torch.float32))
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    b, a = np.polyfit(np.array(BENCH_TOKENS, dtype=float), np.array(times), 1)
    fit = HostFit(max(float(a), 0.0), max(float(b), 0.0))
    cached[key] = [fit.a, fit.b]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time
    return fit


class MissPolicy:
    """Splits a layer call's missed experts that must be exact between the link (copy, then compute on the device)
    and the host. The runtime asks `split` once per layer call with misses and tells `observe` how long each host job
    took; a policy is built by `patch` as cls(miss_path, engine, host, fit, counters) (`OffloadOptions.miss_path`
    may name a subclass, which runs as "auto": with the host's costs measured)."""

    name: ClassVar[str] = ""  # what the stats report as the miss path; empty: the class's own name

    def __init__(
        self, miss_path: str, engine: TransferEngine, host: HostCompute, fit: HostFit | None, counters: Counters
    ):
        self.miss_path, self.engine, self.host, self.fit = miss_path, engine, host, fit
        self.counters = counters  # writes auto_host, auto_copy, explored
        self.pass_s: float | None = None  # device seconds per expert of a few-token kernel pass (None: not yet timed)

    def split(self, tokens: dict[int, int], admit: Callable[[int], bool] = lambda e: True) -> tuple[set[int], set[int]]:
        """tokens: missed expert -> tokens routed to it; admit: whether the cache would keep a copy of it (it evicts
        no expert needed more often). Returns (copy, host)."""
        raise NotImplementedError

    def observe(self, tokens: list[int], seconds: float) -> None:
        """A host job for experts of these token counts took `seconds`: refine the host estimate."""
        if self.fit is not None:
            self.fit.observe(tokens, seconds)

    def observe_pass(self, experts: int, seconds: float) -> None:
        """A kernel pass on the device over `experts` experts at few tokens took `seconds`: what computing a copied
        expert costs the device (on a CPU device, the same cores the host computes on)."""
        per = seconds / max(1, experts)
        self.pass_s = moving_average(self.pass_s, per, FIT_DECAY)


class MissRouter(MissPolicy):
    """miss_path "host": every miss on the host; "auto": the cost model (`fit` measured). The cost model cannot lock
    itself in: the link is timed on every copy (speculative and background copies too), and while it sends nothing
    to the host, one miss in `EXPLORE_EVERY` layer calls goes there anyway (the one with fewest tokens), so a host
    estimate taken on a loaded machine, or a host that has become faster, is corrected within a few tokens. Regret:
    at most one expert per `EXPLORE_EVERY` calls with misses computed where it was estimated slower."""

    def __init__(
        self, miss_path: str, engine: TransferEngine, host: HostCompute, fit: HostFit | None, counters: Counters
    ):
        if miss_path not in ("host", "auto") or (miss_path == "auto" and fit is None):
            raise ValueError(
                f"MissRouter needs miss_path 'host', or 'auto' with measured host costs; got {miss_path!r}"
            )
        super().__init__(miss_path, engine, host, fit, counters)
        self._since_host = 0  # layer calls with misses since the host last computed one

    def split(self, tokens: dict[int, int], admit: Callable[[int], bool] = lambda e: True) -> tuple[set[int], set[int]]:
        if self.miss_path == "host":
            self.counters.auto_host += len(tokens)
            return set(), set(tokens)
        copy, host = set(), set()
        copy_s = self.engine.copy_seconds() or 0.0
        link_t, host_t = self.engine.demand_wait_seconds(), 0.0
        # a CPU device computes on the host's own cores (host jobs on the calling thread): a copied expert then
        # costs that CPU a kernel pass after it lands, and jobs and passes take turns; a GPU's pass costs it nothing
        shared = self.host.inline if self.host is not None else self.engine.device.type == "cpu"
        for e, n in sorted(tokens.items(), key=lambda kv: (-kv[1], kv[0])):  # most tokens first
            h = self.fit.seconds(n)
            on_host, on_link = host_t + h, link_t + copy_s
            if shared:
                on_link = max(on_link, host_t) + (self.pass_s if self.pass_s is not None else h)
            if on_host <= on_link or (on_host <= ADMIT_SLACK * on_link and not admit(e)):
                host.add(e)
                host_t = on_host
            else:
                copy.add(e)
                link_t += copy_s
                if shared:  # the CPU computes it after it lands
                    host_t = on_link
        self._since_host = 0 if host else self._since_host + 1
        if self._since_host >= EXPLORE_EVERY:  # keep the host's estimate measured: its cheapest miss goes there
            e = min(copy, key=lambda e: (tokens[e], e))
            copy.discard(e)
            host.add(e)
            self._since_host = 0
            self.counters.explored += 1
        self.counters.auto_host += len(host)
        self.counters.auto_copy += len(copy)
        return copy, host


@dataclass(frozen=True)
class MissPath:
    """The exact-miss path in effect, resolved once from the options and the device (`OffloadOptions.miss_setup`):
    `mode` "fetch" (every miss copied in: no host, no policy), "host" or "auto" (a measured cost model), and the
    `policy` class that splits each call's misses between the link and the host."""

    mode: str
    policy: type[MissPolicy] | None = None

    @property
    def name(self) -> str:
        """What the stats report: the mode, or a custom policy's own name."""
        if self.policy is None or self.policy is MissRouter:
            return self.mode
        return self.policy.name or self.policy.__name__

    @property
    def uses_host(self) -> bool:
        """Some misses may be computed on the host (and copies are admitted, weighing their victims)."""
        return self.policy is not None

    def router(self, engine: TransferEngine, host: HostCompute | None, counters: Counters) -> MissPolicy | None:
        """The policy for a patched model (the host's costs measured first where the mode needs them); None where
        every miss is fetched, or where nothing can miss (no host)."""
        if self.policy is None or host is None:
            return None
        fit = measure_host(host) if self.mode == "auto" else None
        return self.policy(self.mode, engine, host, fit, counters)
