"""Tables, plots and side-by-side runs for the fairness command line and benchmark."""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .engine import EngineModel  # noqa: E402
from .policy import SchedulingPolicy, make_policy  # noqa: E402
from .request import Request  # noqa: E402
from .simulator import SimResult, simulate  # noqa: E402
from .workloads import load_azure_csv, load_jsonl, load_sharegpt  # noqa: E402

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


def load_trace(path: Path) -> list[Request]:
    """By extension: .csv is the Azure trace, .jsonl VTC / LMSYS-Chat lines, .json ShareGPT."""
    loaders = {".csv": load_azure_csv, ".jsonl": load_jsonl, ".json": load_sharegpt}
    if path.suffix not in loaders:
        raise SystemExit(
            f"unknown trace type {path.suffix!r}: use a .csv (Azure), .jsonl (VTC/LMSYS) or .json (ShareGPT)"
        )
    return loaders[path.suffix](path)


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


def plot(results: list[SimResult], title: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-")
    cols = min(4, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    for ax, res in zip(axes.flat, results, strict=False):
        for client, series in list(res.service.items())[:12]:
            ax.plot(res.times, series, label=client)
        ax.set_title(res.policy)
        ax.set_xlabel("time (s)")
    for row in axes:
        row[0].set_ylabel("cumulative service (weighted tokens)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{title}: service per client over time")
    fig.tight_layout()
    service_png = out / f"fairness-{stem}-service.png"
    fig.savefig(service_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for res in results:
        ttft = sorted(x for v in res.ttft.values() for x in v)
        if ttft:
            ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=res.policy)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{title}: TTFT CDF")
    ax.legend()
    fig.tight_layout()
    cdf_png = out / f"fairness-{stem}-ttft-cdf.png"
    fig.savefig(cdf_png, dpi=100)
    plt.close(fig)
    return [service_png, cdf_png]


class Timed:
    """Forwards every call to a policy and adds up the time each method takes (the scheduler's own overhead)."""

    def __init__(self, inner: SchedulingPolicy):
        self._inner = inner
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __getattr__(self, attr: str):
        value = getattr(self._inner, attr)
        if not callable(value):
            return value

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self.seconds[attr] += time.perf_counter() - t0
                self.calls[attr] += 1

        return timed

    def overhead_us(self) -> dict[str, float]:
        """Mean microseconds per scheduling decision (a next_request call, admitted or not), per arrival (add_request,
        which includes any prediction) and per engine step (on_step + batch_limits)."""

        def per(names: tuple[str, ...], count: str) -> float:
            return 1e6 * sum(self.seconds[n] for n in names) / max(self.calls[count], 1)

        return {
            "decision_us": per(("next_request",), "next_request"),
            "arrival_us": per(("add_request",), "add_request"),
            "step_us": per(("on_step", "batch_limits"), "on_step"),
        }


PolicySpec = str | tuple[str, Callable[[], SchedulingPolicy]]


def run(requests: list[Request], policies: list[PolicySpec], engine: EngineModel, until_s: float | None):
    """Simulate each policy (a registered name, or (label, factory) for configured instances) on the same requests;
    rows of (label, result, wall seconds), with the policy's own overhead added to the result's metrics."""
    rows = []
    for spec in policies:
        label, factory = (spec, lambda n=spec: make_policy(n)) if isinstance(spec, str) else spec
        policy = Timed(factory())
        t0 = time.perf_counter()
        res = simulate(requests, policy, engine=engine, until_s=until_s)
        res.policy = label
        res.metrics.update(policy.overhead_us())
        rows.append((label, res, time.perf_counter() - t0))
    return rows
