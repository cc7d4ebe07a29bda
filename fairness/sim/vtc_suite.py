"""The VTC paper's workloads (Sheng et al., OSDI 2024), under the paper's names and generated as its artifact
(github.com/Ying1123/VTC-artifact, `fair_bench/exp_suite.py` and `fair_bench/trace.py`, Apache-2.0) generates them:
the same parameters, arrival modes and draws from numpy's legacy generator seeded with 42, so the requests are the
paper's. Clients are named client-0, client-1, ... in the artifact's adapter order.

    requests = fairness.sim.vtc_suite.workload("overload")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fairness.core.request import Request
from fairness.sim.workloads import bundled_trace, load_jsonl

SEED = 42


@dataclass(frozen=True)
class Spec:
    """One workload of the paper's suite: per-client rates (requests/s), duration, length ranges [lo, hi)."""

    rates: tuple[float, ...]
    duration: float
    input_range: tuple[int, int] = (256, 257)
    output_range: tuple[int, int] = (256, 257)
    on_off: float = -1  # seconds on / off for client 0 (-1: always on)
    mode: str = "uniform"
    weights: tuple[float, ...] = ()  # the weighted variant's client weights (the artifact's --fair-weights)


SUITE = {
    "overload": Spec((1.5, 3), 360),
    "overload-multi": Spec((0.4, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6, 0.6), 360),
    "overload-weighted": Spec((0.8, 0.8, 1.2, 1.6), 360, weights=(1, 2, 3, 4)),
    "proportional": Spec((0.25, 0.5, 1.5), 600),
    "increase": Spec((0.5, 2), 600, mode="increase"),
    "on_off_less": Spec((0.5, 2), 600, on_off=60),
    "on_off_overload": Spec((2, 3), 600, on_off=60),
    "poisson_on_off_overload": Spec((0.5, 2), 600, (16, 512), (16, 512), on_off=60, mode="poisson"),
    "poisson_short_long": Spec((8, 1.5), 600, mode="poisson-short-long"),
    "poisson_short_long_2": Spec((8, 1.5), 600, (32, 33), (512, 513), mode="poisson-short-long-2"),
    "dist_shift": Spec((-1, -1), 900, mode="dist_shift"),
}


def workload(name: str) -> list[Request]:
    """The paper's workload `name` (see SUITE), or "real": the LMSYS arena trace of its section 6.3."""
    if name == "real":
        return load_jsonl(bundled_trace("lmsys-arena-vtc.jsonl"))
    if name not in SUITE:
        raise ValueError(f"unknown VTC workload {name!r}; choose one of {sorted(SUITE) + ['real']}")
    spec = SUITE[name]
    rng = np.random.RandomState(SEED)  # numpy's legacy generator: the artifact's np.random.seed(42) stream
    make = {"uniform": _uniform, "increase": _increase, "dist_shift": _dist_shift}.get(spec.mode, _mixed)
    reqs = make(spec, rng)
    weights = dict(enumerate(spec.weights))
    reqs = [
        Request(
            r.client,
            r.arrival_s,
            r.input_tokens,
            r.output_tokens,
            r.output_tokens,
            float(weights.get(int(r.client.split("-")[1]), 1.0)),
        )
        for r in reqs
    ]
    return sorted(reqs, key=lambda r: r.arrival_s)


def _client(i: int) -> str:
    return f"client-{i}"


def _on(spec_on_off: float, t: float) -> bool:
    """Client 0 of an on/off workload sends during even periods only."""
    return spec_on_off == -1 or int(t // spec_on_off) % 2 == 0


def _periodic(rng, client: int, rate: float, count: int, start: float, spec: Spec, on_off: float) -> list[Request]:
    """`count` requests at a fixed interval from a random phase after `start` (the artifact's uniform mode)."""
    ins = rng.randint(spec.input_range[0], spec.input_range[1], count)
    outs = rng.randint(spec.output_range[0], spec.output_range[1], count)
    t = start + rng.rand() / rate
    out = []
    for j in range(count):
        t += 1 / rate
        if client != 0 or _on(on_off, t):
            out.append(Request(_client(client), t, int(ins[j]), int(outs[j])))
    return out


def _uniform(spec: Spec, rng) -> list[Request]:
    reqs = []
    for i, rate in enumerate(spec.rates):
        reqs += _periodic(rng, i, rate, int(rate * spec.duration), 0.0, spec, spec.on_off)
    return reqs


def _increase(spec: Spec, rng) -> list[Request]:
    """Client 0 steady at rates[0]; client 1 from 0.2 requests/s rising linearly to rates[1], no random phase."""
    reqs = []
    count = int(spec.rates[0] * spec.duration)
    ins, outs = (rng.randint(*r, count) for r in (spec.input_range, spec.output_range))
    t = 0.0
    for j in range(count):
        t += 1 / spec.rates[0]
        if _on(spec.on_off, t):
            reqs.append(Request(_client(0), t, int(ins[j]), int(outs[j])))
    start, end = 0.2, spec.rates[1]
    count = int(0.5 * (start + end) * spec.duration)
    ins, outs = (rng.randint(*r, count) for r in (spec.input_range, spec.output_range))
    t = 0.0
    for j in range(count):
        t += 1 / (start + (end - start) * t / spec.duration)
        reqs.append(Request(_client(1), t, int(ins[j]), int(outs[j])))
    return reqs


def _mixed(spec: Spec, rng) -> list[Request]:
    """One Poisson stream split between two clients in proportion to their rates (poisson* modes)."""
    total = int(sum(spec.rates) * spec.duration)
    which = (rng.rand(total) > spec.rates[0] / sum(spec.rates)).astype(int)
    ins = rng.randint(spec.input_range[0], spec.input_range[1], total)
    outs = rng.randint(spec.output_range[0], spec.output_range[1], total)
    gaps = rng.gamma(1.0, 1.0 / sum(spec.rates), total)  # cv = 1: exponential gaps
    reqs, t = [], 0.0
    for i in range(total):
        t += gaps[i]
        n_in, n_out = int(ins[i]), int(outs[i])
        if which[i] == 0:
            if not _on(spec.on_off, t):
                continue
            if spec.mode == "poisson-short-long":  # client 0 sends a quarter of the lengths
                n_in, n_out = n_in // 4, n_out // 4
            elif spec.mode == "poisson-short-long-2":  # client 0 swaps input and output lengths
                n_in, n_out = n_out, n_in
        reqs.append(Request(_client(int(which[i])), t, n_in, n_out))
    return reqs


def _dist_shift(spec: Spec, rng) -> list[Request]:
    """Three phases of duration / 3: on/off (0.5 vs 2 requests/s), overload (1 vs 1), proportional (0.5 vs 1.5)."""
    reqs = []
    for k, (rates, on_off) in enumerate((((0.5, 2), 60), ((1, 1), -1), ((0.5, 1.5), -1))):
        for i, rate in enumerate(rates):
            count = int(rate * spec.duration / 3)
            reqs += _periodic(rng, i, rate, count, k * spec.duration / 3, spec, on_off)
    return reqs
