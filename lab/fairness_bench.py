"""The fairness part of `make bench` (simulated engine):

1. MoPE: collect simulator logs (VTC scheduling) from the synthetic workloads generated with seed 1 and from the
   first half of each real trace; train a 3-expert MoPE and a single regressor (3 seeds each) on the earliest 70% of
   each source, report L1 errors on the rest; export them to ONNX.
2. Every policy, Equinox served by the seed-0 MoPE's ONNX model, on data it never saw: the synthetic workloads with
   seed 0 and the second half of each real trace.
3. The VTC paper's workloads on its S-LoRA engine preset, every policy beside the paper's own runs (`vtc_paper`):
   `overload` by default, all twelve with --mode full.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np

from fairness import EngineModel, Request, load_azure_csv, load_jsonl, make_workload, mope, simulate
from fairness.core.equinox import Equinox
from fairness.core.predictor import HistoryPredictor, OnnxPredictor
from fairness.sim.workloads import bundled_trace
from lab.fairness_plots import plot_runs
from lab.fairness_report import run, table
from lab.vtc_paper import run_paper_suite

SUITE = ["overload", "proportional", "on-off", "poisson-short-long", "increasing", "distribution-shift"]
BASELINES = ["fcfs", "rpm", "vtc", "vtc-pred"]
MODES = ("quick", "default", "full")
SEEDS = (0, 1, 2)  # MoPE and the single regressor are each trained with these seeds; the scheduler uses the first


def simulator_speed(requests: int) -> dict[str, float]:
    """Wall time to simulate `requests` requests of 30 clients, 1,000 a minute (VTC policy)."""
    rng = random.Random(0)
    reqs = [Request(f"c{rng.randrange(30)}", rng.uniform(0, requests * 0.06), rng.randint(16, 512),
                    rng.randint(16, 512)) for _ in range(requests)]  # fmt: skip
    t0 = time.perf_counter()
    res = simulate(reqs, "vtc", engine=EngineModel.preset("h100-llama3-8b"))
    return {"requests": requests, "clients": 30, "wall_s": time.perf_counter() - t0,
            "simulated_s": res.metrics["makespan_s"]}  # fmt: skip


def halves(requests: list[Request]) -> tuple[list[Request], list[Request]]:
    """A trace cut at its median arrival time; the second half starts at t = 0."""
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    cut = reqs[len(reqs) // 2].arrival_s
    second = [Request(r.client, r.arrival_s - cut, r.input_tokens, r.output_tokens, r.max_output_tokens, r.weight)
              for r in reqs if r.arrival_s >= cut]  # fmt: skip
    return [r for r in reqs if r.arrival_s < cut], second


def _traces(with_azure: bool) -> list[tuple[str, list[Request], str]]:
    """(name, requests, engine preset) of each real trace: ~5 requests/s of ~1k-token Azure prompts would leave an
    A10G-class engine hours behind, so Azure runs on the A100 preset."""
    out = [("lmsys-arena", load_jsonl(bundled_trace("lmsys-arena-vtc.jsonl")), "a10g-llama2-7b")]
    if with_azure:
        out.append(("azure-conv", load_azure_csv(bundled_trace("azure-llm-2023-conv.csv")), "a100-llama2-7b"))
    return out


def train_predictors(out: Path, mode: str = "default") -> dict:
    """Part 1: logs, training, held-out L1 errors, ONNX export. Returns the report (paths included)."""
    quick = mode == "quick"
    seeds = SEEDS if mode == "full" else SEEDS[:1]
    duration, steps = (120, 60) if quick else (600, 400)
    t0 = time.perf_counter()
    parts = []
    for w in (SUITE[:2] if quick else SUITE) + ["sharegpt-like"]:
        parts.append(mope.collect(make_workload(w, duration, seed=1), EngineModel.preset("a10g-llama2-7b"),
                                  source=w, until_s=duration))  # fmt: skip
    for name, reqs, preset in _traces(mode == "full"):
        parts.append(mope.collect(halves(reqs)[0], EngineModel.preset(preset), source=name))
    data = mope.Dataset.concat(parts)
    train, test = data.split(0.7)
    collect_s = time.perf_counter() - t0
    report: dict = {"rows_train": len(train), "rows_test": len(test), "collect_s": collect_s, "seeds": list(seeds),
                    "models": {}}  # fmt: skip
    constant = np.median(train.y[:, 0])
    report["models"]["median (constant)"] = {"l1": {"output_tokens": float(np.abs(test.y[:, 0] - constant).mean())}}
    report["models"]["client history mean"] = {"l1": mope.l1_errors(HistoryPredictor(), test)}
    for label, experts in (("single regressor", 1), ("MoPE, 3 experts", 3)):
        runs = []
        for seed in seeds:  # training noise is of the order of the difference between the two: report the spread
            t0 = time.perf_counter()
            model = mope.train(train, experts=experts, steps=steps, seed=seed)
            train_s = time.perf_counter() - t0
            path = model.export(out / f"mope-{experts}-seed{seed}.onnx")
            served = OnnxPredictor(path)
            runs.append({"seed": seed, "onnx": str(path), "train_s": train_s, "l1": mope.l1_errors(served, test),
                         "onnx_max_abs_diff": float(np.abs(served.predict(test.x) - model.predict(test.x)).max()),
                         "output_l1_by_source": {str(s): mope.l1_errors(served, test.take(test.source == s))[
                             "output_tokens"] for s in np.unique(test.source)}})  # fmt: skip
        mean_l1 = {k: float(np.mean([r["l1"][k] for r in runs])) for k in runs[0]["l1"]}
        out_l1 = [r["l1"]["output_tokens"] for r in runs]
        report["models"][label] = {"l1": mean_l1, "output_l1_min": min(out_l1), "output_l1_max": max(out_l1),
                                   "onnx": runs[0]["onnx"], "runs": runs,
                                   "onnx_max_abs_diff": max(r["onnx_max_abs_diff"] for r in runs)}  # fmt: skip
    return report


def _print_predictors(report: dict) -> None:
    print(f"\nMoPE predictors: {report['rows_train']} training rows, {report['rows_test']} held-out rows "
          "(simulator logs; L1 error on the held-out rows)")  # fmt: skip
    print(f"mean over training seeds {report['seeds']} where trained; [min, max] of the output-token error")
    print(f"{'predictor':<22}{'out tokens':>12}{'range':>16}{'TTFT s':>10}{'e2e s':>10}{'tok/s':>8}{'util':>7}")
    for label, m in report["models"].items():
        cells = [m["l1"].get(k, float("nan")) for k in ("output_tokens", "ttft_s", "e2e_s", "throughput_tok_s",
                                                         "batch_util")]  # fmt: skip
        spread = f"[{m['output_l1_min']:.1f}, {m['output_l1_max']:.1f}]" if "runs" in m else ""
        print(
            f"{label:<22}{cells[0]:>12.1f}{spread:>16}{cells[1]:>10.2f}{cells[2]:>10.2f}{cells[3]:>8.2f}"
            f"{cells[4]:>7.3f}"
        )


def run_fairness_bench(out: Path, mode: str = "default") -> dict:
    """mode "quick": two synthetic workloads and the LMSYS trace, 120 s each, the simulator's speed on 2,000
    requests (10,000 otherwise); "default": every synthetic workload and
    the LMSYS trace for 600 s, one training seed, the VTC paper's `overload`; "full": also the Azure trace,
    three training seeds, Equinox's ablations and the VTC paper's whole suite."""
    if mode not in MODES:
        raise ValueError(f"unknown fairness bench mode {mode!r}; choose one of {list(MODES)}")
    out.mkdir(parents=True, exist_ok=True)
    quick, full = mode == "quick", mode == "full"
    predictors = train_predictors(out, mode)
    _print_predictors(predictors)
    onnx_path = predictors["models"]["MoPE, 3 experts"]["onnx"]
    policies = BASELINES + [("equinox", lambda: Equinox(predictor=onnx_path))]
    if mode != "default":  # Equinox's ablations: cheap at quick's 120 s, left to full otherwise
        policies += [
            ("equinox-static", lambda: Equinox(predictor=onnx_path, adaptive=False)),  # ablation: no adaptive batching
            ("equinox-tokens", lambda: Equinox(predictor=onnx_path, alpha=1.0, gamma=0.0)),  # ablation: tokens only
        ]
    duration = 120 if quick else 600
    cases = [(w, make_workload(w, duration), duration, "a10g-llama2-7b")
             for w in (SUITE[:2] if quick else SUITE) + ["sharegpt-like"]]  # fmt: skip
    cases += [(f"{name} (2nd half)", halves(reqs)[1], None, preset) for name, reqs, preset in _traces(full)]
    summary: dict = {"simulated": True, "mode": mode, "predictors": predictors, "workloads": {}}
    for name, requests, until, preset in cases:
        rows = run(requests, policies, EngineModel.preset(preset), until)
        print(f"\nfairness: {name}, {len(requests)} requests, {len({r.client for r in requests})} clients "
              f"(simulated engine {preset})")  # fmt: skip
        print(table(rows))
        plot_runs([r for _, r, _ in rows], name, out)
        summary["workloads"][name] = {"engine": preset, **{p: {"metrics": res.metrics, "sim_wall_s": s}
                                                           for p, res, s in rows}}  # fmt: skip
    paper = ["fcfs", "rpm", "lcf", "vtc", "vtc-pred", ("equinox", lambda: Equinox(predictor=onnx_path))]
    summary["vtc_paper"] = run_paper_suite(paper, None if full else ["overload"])
    summary["simulator_speed"] = simulator_speed(2_000 if quick else 10_000)
    print(f"\nsimulator speed: {summary['simulator_speed']}")
    (out / "fairness.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"wrote {out / 'fairness.json'} and plots in {out}/")
    return summary


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="The fairness part of make bench (simulated engine).")
    ap.add_argument("--mode", choices=MODES, default="default", help="see run_fairness_bench")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    run_fairness_bench(args.out, args.mode)


if __name__ == "__main__":
    main()
