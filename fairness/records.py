"""Per-request records and the fairness metrics computed from them alone, so that a simulated run and a served run
(`fairness.loadgen`) are measured by the same code, line for line.

A request's service, (w_p x input + w_q x output) / weight, is spread evenly between its first token and its finish
(as the VTC paper's plots spread it); a client is backlogged while it has a request that arrived and has not
produced its first token yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .metrics import FairnessTracker, percentile

W_P, W_Q = 1.0, 2.0


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


def record_metrics(
    records: Sequence[RequestRecord], resolution_s: float = 0.1, window_s: float = 60.0, end_s: float | None = None
) -> RecordMetrics:
    """Fairness, latency and throughput of a run from its records, on a time grid of `resolution_s`.

    max_service_diff and jain are the simulator's measures (`FairnessTracker`), acc_service_diff the VTC paper's
    headline (max over time of max - min over clients of accumulated service), window_service_diff_* the paper's
    table (per `window_s` window, the max - min over clients of the service rate, tokens/s).
    """
    if not records:
        raise ValueError("record_metrics needs at least one record")
    clients = sorted({r.client for r in records})
    idx = {c: i for i, c in enumerate(clients)}
    start = min(r.arrival_s for r in records)
    done = [r.finish_s for r in records if r.finish_s is not None]
    end = end_s if end_s is not None else max(done + [r.arrival_s for r in records])
    steps = max(1, math.ceil((end - start) / resolution_s)) + 1
    times = start + resolution_s * np.arange(steps)
    cell = lambda t: min(steps - 1, max(0, int(math.ceil((t - start) / resolution_s))))  # noqa: E731
    gained = np.zeros((len(clients), steps))  # service gained in each grid cell
    queued = np.zeros((len(clients), steps))  # +1 at arrival, -1 at first token
    for r in records:
        c = idx[r.client]
        queued[c, cell(r.arrival_s)] += 1
        if r.first_token_s is None:
            continue
        queued[c, cell(r.first_token_s)] -= 1
        if r.finish_s is None:
            continue
        service = (W_P * r.input_tokens + W_Q * r.output_tokens) / r.weight
        a, b = cell(r.first_token_s), cell(r.finish_s)
        gained[c, a : b + 1] += service / (b - a + 1)  # spread evenly from the first token to the finish
    cumulative = gained.cumsum(axis=1)
    waiting = queued.cumsum(axis=1)
    tracker = FairnessTracker(clients, sample_every_s=resolution_s, window_s=window_s)
    for k, t in enumerate(times):
        for c, name in enumerate(clients):
            if gained[c, k]:
                tracker.serve(name, gained[c, k])
        tracker.observe(float(t), {name: int(waiting[c, k] > 0.5) for c, name in enumerate(clients)})
    spread = cumulative.max(axis=0) - cumulative.min(axis=0)
    per_window = max(1, int(round(window_s / resolution_s)))
    edges = list(range(0, steps, per_window))
    rates = np.array([(cumulative[:, min(e + per_window, steps) - 1] - (cumulative[:, e - 1] if e else 0)) / window_s
                      for e in edges])  # [W, C]  # fmt: skip
    window_diff = rates.max(axis=1) - rates.min(axis=1)
    ttft = {c: [r.first_token_s - r.arrival_s for r in records if r.client == c and r.first_token_s is not None]
            for c in clients}  # fmt: skip
    e2e = [r.finish_s - r.arrival_s for r in records if r.finish_s is not None]
    all_ttft = [x for v in ttft.values() for x in v]
    makespan = max(end - start, 1e-9)
    out_tokens = sum(r.output_tokens for r in records if r.finish_s is not None)
    in_tokens = sum(r.input_tokens for r in records if r.finish_s is not None)
    metrics = {
        "max_service_diff": tracker.max_diff,
        "jain": tracker.jain(),
        "acc_service_diff": float(spread.max()),
        "window_service_diff_max": float(window_diff.max()),
        "window_service_diff_avg": float(window_diff.mean()),
        "window_service_diff_var": float(window_diff.var()),
        "throughput_tok_s": out_tokens / makespan,
        "throughput_in_out_tok_s": (in_tokens + out_tokens) / makespan,
        "ttft_p50_s": percentile(all_ttft, 50),
        "ttft_p99_s": percentile(all_ttft, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
        "finished": float(len(done)),
        "requests": float(len(records)),
        "makespan_s": makespan,
    }
    per_client = {c: {"service": float(cumulative[idx[c], -1]), "ttft_p50_s": percentile(ttft[c], 50),
                      "requests": float(sum(r.client == c for r in records))} for c in clients}  # fmt: skip
    return RecordMetrics(metrics, per_client, times, {c: cumulative[idx[c]] for c in clients}, ttft)
