"""Side-by-side runs and their tables, for the fairness command line and benchmark (plots: `lab.fairness_plots`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from fairness.core.engine_model import EngineModel
from fairness.core.policy import SchedulingPolicy, make_policy
from fairness.core.request import Request
from fairness.sim.simulator import SimResult, simulate

COLUMNS = [
    ("max_service_diff", "max svc diff", "{:.0f}"),
    ("jain", "Jain", "{:.3f}"),
    ("throughput_tok_s", "out tok/s", "{:.0f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
    ("utilization", "busy", "{:.2f}"),
    ("compute_utilization", "compute util", "{:.2f}"),
    ("useful_compute_utilization", "useful util", "{:.2f}"),
    ("preemptions", "preempts", "{:.0f}"),
    ("decision_us", "decide us", "{:.1f}"),
    ("arrival_us", "arrive us", "{:.1f}"),
    ("step_us", "step us", "{:.1f}"),
]


def table(rows: list[tuple[str, SimResult, float]]) -> str:
    head = f"{'policy':<15}" + "".join(f"{title:>13}" for _, title, _ in COLUMNS) + f"{'sim s':>7}"
    lines = [head, "-" * len(head)]
    for name, res, secs in rows:
        cells = "".join(
            f"{'n/a' if math.isnan(res.metrics.get(k, math.nan)) else fmt.format(res.metrics[k]):>13}"
            for k, _, fmt in COLUMNS
        )
        lines.append(f"{name:<15}{cells}{secs:>7.1f}")
    return "\n".join(lines)


PolicySpec = str | tuple[str, Callable[[], SchedulingPolicy]]


def run(requests: list[Request], policies: list[PolicySpec], engine: EngineModel, until_s: float | None):
    """Simulate each policy (a registered name, or (label, factory) for configured instances) on the same requests;
    rows of (label, result, wall seconds)."""
    rows = []
    for spec in policies:
        label, factory = (spec, lambda n=spec: make_policy(n)) if isinstance(spec, str) else spec
        t0 = time.perf_counter()
        res = simulate(requests, factory(), engine=engine, until_s=until_s)
        res.policy = label
        rows.append((label, res, time.perf_counter() - t0))
    return rows
