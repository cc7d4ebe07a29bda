"""Plots of simulated or served runs: service per client over time and TTFT CDFs (matplotlib is imported only when
something is drawn)."""

from __future__ import annotations

import re
from pathlib import Path

from fairness.sim.simulator import SimResult
from lab.figures import figure


def safe_stem(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-")


def plot_runs(results: list[SimResult], title: str, out: Path) -> list[Path]:
    """Service over time (one panel per policy) and the TTFT CDF of every policy; returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = safe_stem(title)
    cols = min(4, len(results))
    rows = -(-len(results) // cols)
    fig, axes = figure(rows, cols, figsize=(4.2 * cols, 3.2 * rows), sharey=True, squeeze=False)
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

    fig, ax = figure(figsize=(5.5, 3.6))
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
    return [service_png, cdf_png]
