"""The VTC paper's experiments in the simulator, beside the paper's own runs.

Every workload of `vtc_suite` runs on the S-LoRA preset (`a10g-llama2-7b-slora`) under each policy; the reference is
`lab/data/vtc_artifact_metrics.json`: the same measures (`records.paper_metrics`) taken from the per-request records the
artifact publishes for the authors' A10G runs (regenerate with `python -m lab.vtc_artifact_metrics`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fairness.core.engine_model import EngineModel
from fairness.measure.bound import vtc_bound
from fairness.sim.vtc_suite import SUITE, workload
from lab.fairness_report import PolicySpec, run

PRESET = "a10g-llama2-7b-slora"
MEASURES = [("acc_service_diff", "acc diff", "{:.0f}"), ("window_service_diff_max", "win max", "{:.1f}"),
            ("window_service_diff_avg", "win avg", "{:.1f}"), ("window_service_diff_var", "win var", "{:.0f}"),
            ("throughput_in_out_tok_s", "in+out tok/s", "{:.0f}")]  # fmt: skip


def artifact_reference() -> dict[tuple[str, str], dict]:
    """(workload, policy) -> the measures of the artifact's published run of it, where that run used the paper's
    configuration of the workload (the artifact also holds runs of other durations and rates under the same names,
    e.g. FCFS on a 600 s overload)."""
    doc = json.loads((Path(__file__).parent / "data" / "vtc_artifact_metrics.json").read_text())
    return {(r["workload"], r["policy"]): r for r in doc["runs"] if _as_in_the_paper(r)}


def _as_in_the_paper(run: dict) -> bool:
    spec = SUITE.get(run["workload"])
    return spec is None or (run["config"]["duration"], tuple(run["config"]["req_rate"])) == (spec.duration, spec.rates)


def _row(label: str, values: dict, bound: str = "") -> str:
    return f"{label:<36}" + "".join(f"{fmt.format(values[k]):>14}" for k, _, fmt in MEASURES) + f"{bound:>12}"


def run_paper_suite(policies: list[PolicySpec], workloads: list[str] | None = None) -> dict:
    """Simulate each workload under each policy; print each beside the artifact's runs; return the numbers."""
    t0 = time.perf_counter()
    engine = EngineModel.preset(PRESET)
    reference = artifact_reference()
    out: dict = {}
    for name in workloads or [*SUITE, "real"]:
        requests = workload(name)
        rows = run(requests, policies, engine, None)
        print(f"\nVTC paper: {name}, {len(requests)} requests (simulated {PRESET} beside the artifact's A10G runs)")
        print(f"{'policy':<36}" + "".join(f"{title:>14}" for _, title, _ in MEASURES) + f"{'worst/2U':>12}")
        out[name] = {}
        bound = vtc_bound(requests, engine.kv_tokens)
        for label, res, secs in rows:
            ratio = res.metrics["worst_interval_service_diff"] / bound  # the worst backlogged sub-interval / 2U
            print(_row(f"{label} (sim)", res.metrics, f"{ratio:.3f}"))
            ref = reference.get((name, label))
            if ref:
                print(_row(f"{label} (paper's run)", ref))
            out[name][label] = {"sim": {k: res.metrics[k] for k, _, _ in MEASURES}, "sim_wall_s": secs,
                                "worst_interval_service_diff": res.metrics["worst_interval_service_diff"],
                                "ratio_to_2U": ratio,
                                "paper": {k: ref[k] for k, _, _ in MEASURES} if ref else None}  # fmt: skip
        extra = sorted(p for (w, p) in reference if w == name and p not in out[name])
        for label in extra:
            print(_row(f"{label} (paper's run only)", reference[(name, label)]))
    return {"preset": PRESET, "wall_s": time.perf_counter() - t0, "workloads": out}
