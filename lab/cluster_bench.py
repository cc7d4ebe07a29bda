"""The cluster simulator at scale: 64 replicas (the a100-llama2-7b engine model: MODELLED, not measured), 10,000 Zipf
tenants, 1,000 requests/s with the Azure 2023 conversation trace's bursts and sizes, 60 s; VTC as one counter for all
replicas (a fair gateway) against a VTC per replica behind round-robin and least-loaded balancers. Writes cluster.json.

    python -m lab.cluster_bench [--out bench-results] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fairness.sim.cluster import MODES, cluster_workload, simulate_cluster

REPLICAS, TENANTS, RATE = 64, 10_000, 1000.0


def run_cluster_bench(out: Path, seconds: float = 60.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    requests = cluster_workload(TENANTS, RATE, seconds)
    summary: dict = {"simulated": True, "engine": "a100-llama2-7b (modelled)", "replicas": REPLICAS,
                     "tenants": TENANTS, "rate_per_s": RATE, "seconds": seconds, "window_s": 30.0,
                     "workload_s": time.perf_counter() - t0, "modes": {}}  # fmt: skip
    for mode in MODES:
        summary["modes"][mode] = simulate_cluster(requests, "vtc", REPLICAS, mode, window_s=30.0)
    (out / "cluster.json").write_text(json.dumps(summary, indent=1, default=float))
    print(table(summary))
    return summary


def table(s: dict) -> str:
    lines = [f"\ncluster (SIMULATED): {s['replicas']} replicas, {s['tenants']} Zipf tenants, {s['rate_per_s']:.0f} "
             f"req/s for {s['seconds']:g} s, VTC; fairness over {s['window_s']:g}-s windows among tenants backlogged "
             "throughout"]  # fmt: skip
    head = (f"{'mode':<14}{'within 10%':>12}{'Jain':>8}{'spread':>8}{'backlogged':>12}{'tok/s':>10}"
            f"{'decision us':>13}{'policy us/req':>15}{'wall s':>8}")  # fmt: skip
    lines += [head, "-" * len(head)]
    for mode, m in s["modes"].items():
        lines.append(f"{mode:<14}{m['within_10pct']:>12.2f}{m['jain']:>8.3f}{m['spread']:>8.2f}{m['backlogged']:>12.0f}"
                     f"{m['throughput_tok_s']:>10.0f}{m['decision_us']:>13.1f}{m['policy_us_per_request']:>15.1f}"
                     f"{m['wall_s']:>8.1f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="The cluster simulator at scale.")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args(argv)
    run_cluster_bench(args.out, args.seconds)


if __name__ == "__main__":
    main()
