"""Tables, plots and side-by-side runs for the fairness command line and benchmark."""

from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .engine import EngineModel  # noqa: E402
from .request import Request  # noqa: E402
from .simulator import SimResult, simulate  # noqa: E402
from .workloads import load_azure_csv, load_jsonl, load_sharegpt  # noqa: E402

COLUMNS = [
    ("max_service_diff", "max svc diff", "{:.0f}"),
    ("jain", "Jain", "{:.3f}"),
    ("throughput_tok_s", "out tok/s", "{:.0f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
    ("utilization", "util", "{:.2f}"),
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
    head = f"{'policy':<12}" + "".join(f"{title:>14}" for _, title, _ in COLUMNS) + f"{'sim s':>8}"
    lines = [head, "-" * len(head)]
    for name, res, secs in rows:
        cells = "".join(
            f"{'n/a' if math.isnan(res.metrics[k]) else fmt.format(res.metrics[k]):>14}" for k, _, fmt in COLUMNS
        )
        lines.append(f"{name:<12}{cells}{secs:>8.1f}")
    return "\n".join(lines)


def plot(results: list[SimResult], title: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = title.replace("/", "_").replace(" ", "_")
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), sharey=True, squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for client, series in list(res.service.items())[:12]:
            ax.plot(res.times, series, label=client)
        ax.set_title(res.policy)
        ax.set_xlabel("time (s)")
    axes[0][0].set_ylabel("cumulative service (weighted tokens)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
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


def run(requests: list[Request], policies: list[str], engine: EngineModel, until_s: float | None):
    rows = []
    for name in policies:
        t0 = time.perf_counter()
        res = simulate(requests, name, engine=engine, until_s=until_s)
        rows.append((name, res, time.perf_counter() - t0))
    return rows
