"""Per-request records and the fairness metrics computed from them alone, so that a simulated run and a served run
(`lab.loadgen`) are measured by the same code, line for line.

A request's service, (w_p x input + w_q x output) / weight, is spread evenly between its first token and its finish
(as the VTC paper's plots spread it); a client is backlogged while it has a request that arrived and has not
produced its first token yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fairness.core.service import service
from fairness.measure.metrics import FairnessTracker, percentile


@dataclass(frozen=True)
class RequestRecord:
    """One request as it was served (seconds on one clock); first_token_s / finish_s are None if it never got there."""

    client: str
    arrival_s: float
    input_tokens: int
    output_tokens: int
    first_token_s: float | None
    finish_s: float | None
    weight: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecordMetrics:
    metrics: dict[str, float]
    per_client: dict[str, dict[str, float]]
    times: np.ndarray  # [G] grid times (s)
    service: dict[str, np.ndarray]  # client -> [G] cumulative service
    ttft: dict[str, list[float]]


def latencies(records: Sequence[RequestRecord]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each client's times to first token and end-to-end latencies (requests that got there), in record order."""
    clients = sorted({r.client for r in records})
    ttft: dict[str, list[float]] = {c: [] for c in clients}
    e2e: dict[str, list[float]] = {c: [] for c in clients}
    for r in records:
        if r.first_token_s is not None:
            ttft[r.client].append(r.first_token_s - r.arrival_s)
        if r.finish_s is not None:
            e2e[r.client].append(r.finish_s - r.arrival_s)
    return ttft, e2e


def latency_metrics(ttft: dict[str, list[float]], e2e: dict[str, list[float]]) -> dict[str, float]:
    """p50 and p99 of TTFT and end-to-end latency over every client's requests."""
    all_ttft, all_e2e = [x for v in ttft.values() for x in v], [x for v in e2e.values() for x in v]
    return {
        "ttft_p50_s": percentile(all_ttft, 50),
        "ttft_p99_s": percentile(all_ttft, 99),
        "e2e_p50_s": percentile(all_e2e, 50),
        "e2e_p99_s": percentile(all_e2e, 99),
    }


def paper_metrics(records: Sequence[RequestRecord], window_s: float = 60.0, resolution_s: float = 0.1) -> dict:
    """The VTC paper's measures, taken as its artifact takes them over the span of arrivals [0, T] (T = the last
    arrival), with service unweighted (input + 2 x output): acc_service_diff, the largest max - min over clients of
    accumulated service (each request's service spread evenly over [first token, finish]); window_service_diff_max /
    _avg / _var, the maximum, mean and variance over 100 ticks of `paper_window_diffs`; and input + output tokens/s."""
    clients = sorted({r.client for r in records})
    idx = {c: i for i, c in enumerate(clients)}
    horizon = max(r.arrival_s for r in records)
    start = min(r.arrival_s for r in records)
    grid = start + resolution_s * np.arange(max(1, math.ceil((horizon - start) / resolution_s)) + 1)  # [G]
    accumulated = np.zeros((len(clients), len(grid)))
    done = [r for r in records if r.finish_s is not None and r.first_token_s is not None]
    for r in done:
        span = max(r.finish_s - r.first_token_s, 1e-9)
        part = np.clip((grid - r.first_token_s) / span, 0.0, 1.0)
        accumulated[idx[r.client]] += service(r.input_tokens, r.output_tokens) * part
    end = max([r.finish_s for r in done] + [horizon])
    makespan = max(end - start, 1e-9)
    diffs = paper_window_diffs(records, clients, horizon, window_s)
    return {
        "acc_service_diff": float((accumulated.max(axis=0) - accumulated.min(axis=0)).max()),
        "window_service_diff_max": float(diffs.max()),
        "window_service_diff_avg": float(diffs.mean()),
        "window_service_diff_var": float(diffs.var()),
        "throughput_in_out_tok_s": float(sum(r.input_tokens + r.output_tokens for r in done) / makespan),
    }


def record_metrics(
    records: Sequence[RequestRecord], resolution_s: float = 0.1, window_s: float = 60.0, end_s: float | None = None
) -> RecordMetrics:
    """Fairness, latency and throughput of a run from its records alone, on a time grid of `resolution_s`: the
    simulator's measures (max_service_diff and jain, by a `FairnessTracker` replay; service divided by weights) and
    the VTC paper's (`paper_metrics`)."""
    if not records:
        raise ValueError("record_metrics needs at least one record")
    clients = sorted({r.client for r in records})
    idx = {c: i for i, c in enumerate(clients)}
    start = min(r.arrival_s for r in records)
    done = [r.finish_s for r in records if r.finish_s is not None]
    end = end_s if end_s is not None else max(done + [r.arrival_s for r in records])
    steps = max(1, math.ceil((end - start) / resolution_s)) + 1
    times = start + resolution_s * np.arange(steps)

    def cell(t: float) -> int:
        return min(steps - 1, max(0, int(math.ceil((t - start) / resolution_s))))

    gained = np.zeros((len(clients), steps))  # service (divided by weights) gained in each grid cell
    queued = np.zeros((len(clients), steps))  # +1 at arrival, -1 at first token
    for r in records:
        c = idx[r.client]
        queued[c, cell(r.arrival_s)] += 1
        if r.first_token_s is None:
            continue
        queued[c, cell(r.first_token_s)] -= 1
        if r.finish_s is None:
            continue
        a, b = cell(r.first_token_s), cell(r.finish_s)
        gained[c, a : b + 1] += service(r.input_tokens, r.output_tokens, r.weight) / (b - a + 1)
    cumulative = gained.cumsum(axis=1)
    waiting = queued.cumsum(axis=1)
    tracker = FairnessTracker(clients, sample_every_s=resolution_s, window_s=window_s)
    for k, t in enumerate(times):
        for c, name in enumerate(clients):
            if gained[c, k]:
                tracker.serve(name, gained[c, k])
        tracker.observe(float(t), {name: int(waiting[c, k] > 0.5) for c, name in enumerate(clients)})
    ttft, e2e = latencies(records)
    makespan = max(end - start, 1e-9)
    out_tokens = sum(r.output_tokens for r in records if r.finish_s is not None)
    metrics = {
        "max_service_diff": tracker.max_diff,
        "worst_interval_service_diff": tracker.worst_interval_diff,
        "jain": tracker.jain(),
        **paper_metrics(records, window_s),
        "throughput_tok_s": out_tokens / makespan,
        **latency_metrics(ttft, e2e),
        "finished": float(len(done)),
        "requests": float(len(records)),
        "makespan_s": makespan,
    }
    per_client = {
        c: {
            "service": float(cumulative[idx[c], -1]),
            "ttft_p50_s": percentile(ttft[c], 50),
            "requests": float(sum(r.client == c for r in records)),
        }
        for c in clients
    }
    return RecordMetrics(metrics, per_client, times, {c: cumulative[idx[c]] for c in clients}, ttft)


def paper_window_diffs(
    records: Sequence[RequestRecord], clients: list[str], horizon: float, window_s: float = 60.0, ticks: int = 100
) -> np.ndarray:
    """The VTC artifact's per-tick service difference (its table's input): at ticks T/100 x k, in a window of
    `window_s` centred there, each client's service rate y_j (service spread over [first token, finish]) and request
    rate r_j (the cost of the requests arriving in the window); the tick's value is the sum over clients of how far
    each is behind the best-served client, capped by how far its service is from its demand."""
    done = [
        r
        for r in records
        if r.finish_s is not None
        and r.first_token_s is not None
        and r.finish_s >= 1
        and r.finish_s - r.first_token_s >= 1e-5
    ]  # as the artifact skips them
    x = horizon / ticks * np.arange(ticks)
    lo, hi = x - window_s / 2, x + window_s / 2  # [K]
    y = np.zeros((len(clients), ticks))
    demand = np.zeros((len(clients), ticks))
    idx = {c: i for i, c in enumerate(clients)}
    for r in done:
        served = service(r.input_tokens, r.output_tokens)
        overlap = np.clip(np.minimum(hi, r.finish_s) - np.maximum(lo, r.first_token_s), 0, None)
        y[idx[r.client]] += served * overlap / (r.finish_s - r.first_token_s)
    for r in records:
        demand[idx[r.client]] += service(r.input_tokens, r.output_tokens) * ((lo <= r.arrival_s) & (r.arrival_s <= hi))
    y, demand = y / window_s, demand / window_s
    best = y.max(axis=0)  # [K]
    return np.minimum(best - y, np.abs(demand - y)).sum(axis=0)
