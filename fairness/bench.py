"""The fairness part of `make bench`: every policy on VTC's workloads and the two real traces (simulated engine)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from . import EngineModel, Request, load_azure_csv, load_jsonl, make_workload, simulate
from .report import plot, run, table

TRACES = Path(__file__).resolve().parent.parent / "examples" / "traces"
POLICIES = ["fcfs", "rpm", "vtc", "vtc-pred"]
SUITE = ["overload", "proportional", "on-off", "poisson-short-long", "increasing", "distribution-shift"]


def simulator_speed() -> dict[str, float]:
    """Wall time to simulate 10,000 requests of 30 clients over 10 minutes (VTC policy)."""
    rng = random.Random(0)
    reqs = [Request(f"c{rng.randrange(30)}", rng.uniform(0, 600), rng.randint(16, 512), rng.randint(16, 512))
            for _ in range(10_000)]  # fmt: skip
    t0 = time.perf_counter()
    res = simulate(reqs, "vtc", engine=EngineModel.preset("h100-llama3-8b"))
    return {"requests": 10_000, "clients": 30, "wall_s": time.perf_counter() - t0,
            "simulated_s": res.metrics["makespan_s"]}  # fmt: skip


def run_fairness_bench(out: Path, quick: bool = False) -> dict:
    engine_name = "a10g-llama2-7b"
    duration = 120 if quick else 600
    cases = [(w, make_workload(w, duration), duration, engine_name) for w in (SUITE[:2] if quick else SUITE)]
    cases.append(("lmsys-arena", load_jsonl(TRACES / "lmsys-arena-vtc.jsonl"), None, engine_name))
    if not quick:  # ~5 requests/s of ~1k-token prompts: an A10G-class engine would fall hours behind
        cases.append(("azure-conv", load_azure_csv(TRACES / "azure-llm-2023-conv.csv"), None, "a100-llama2-7b"))
    summary: dict = {"simulated": True, "workloads": {}}
    for name, requests, until, preset in cases:
        rows = run(requests, POLICIES, EngineModel.preset(preset), until)
        print(f"\nfairness: {name}, {len(requests)} requests, {len({r.client for r in requests})} clients "
              f"(simulated engine {preset})")  # fmt: skip
        print(table(rows))
        plot([r for _, r, _ in rows], name, out)
        summary["workloads"][name] = {"engine": preset, **{p: {"metrics": res.metrics, "sim_wall_s": s}
                                                           for p, res, s in rows}}  # fmt: skip
    summary["simulator_speed"] = simulator_speed()
    print(f"\nsimulator speed: {summary['simulator_speed']}")
    (out / "fairness.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"wrote {out / 'fairness.json'} and plots in {out}/")
    return summary
