"""Command line: run policies side by side on a workload or a trace, print a table, write plots and JSON.

python -m lab.simulate --workload overload --policies fcfs,rpm,vtc
python -m lab.simulate --trace my-trace.jsonl --policies fcfs,vtc
python -m lab.simulate --workload sharegpt-like --policies vtc,equinox --mope mope.onnx
python -m lab.simulate --vtc-paper overload --policies fcfs,lcf,vtc   # the VTC paper's workload and engine
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fairness.core.engine_model import EngineModel
from fairness.core.equinox import Equinox
from fairness.core.policy import policy_names
from fairness.core.predictor import OnnxPredictor
from fairness.sim.vtc_suite import SUITE, workload
from fairness.sim.workloads import WORKLOADS, TraceFormatError, load_trace, make_workload
from lab.fairness_plots import plot_runs
from lab.fairness_report import run, table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Compare scheduling policies on a simulated LLM engine.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--workload", choices=sorted(WORKLOADS), default="overload")
    src.add_argument("--trace", type=Path, help="a trace file: .csv (Azure), .jsonl (VTC/LMSYS), .json (ShareGPT)")
    src.add_argument(
        "--vtc-paper", choices=[*SUITE, "real"], help="a workload of the VTC paper (fairness.sim.vtc_suite)"
    )
    ap.add_argument("--policies", default="fcfs,rpm,vtc,vtc-pred", help=f"comma-separated, from {policy_names()}")
    ap.add_argument("--engine", help="engine preset (default a10g-llama2-7b; a10g-llama2-7b-slora with --vtc-paper)")
    ap.add_argument("--duration", type=float, default=600, help="seconds of synthetic arrivals")
    ap.add_argument("--until", type=float, default=None, help="stop the simulation at this time (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--mope", type=Path, help="a MoPE .onnx file for equinox (default: client-history predictions)")
    args = ap.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in policy_names()]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; registered: {policy_names()}")
    preset = args.engine or ("a10g-llama2-7b-slora" if args.vtc_paper else "a10g-llama2-7b")
    try:
        engine = EngineModel.preset(preset)
        if args.trace:
            requests, title = load_trace(args.trace), args.trace.stem
        elif args.vtc_paper:
            requests, title = workload(args.vtc_paper), f"vtc-paper-{args.vtc_paper}"
        else:
            requests, title = make_workload(args.workload, args.duration, args.seed), args.workload
    except (ValueError, FileNotFoundError, TraceFormatError) as e:
        raise SystemExit(str(e)) from e
    until = args.until if args.until is not None else (None if args.trace or args.vtc_paper else args.duration)
    if args.mope is not None:
        if not args.mope.is_file():
            raise SystemExit(f"--mope {args.mope}: no such file; train one with fairness.mope.train(...).export(path)")
        predictor = OnnxPredictor(args.mope)
        policies = [(p, lambda: Equinox(predictor=predictor)) if p == "equinox" else p for p in policies]
    rows = run(requests, policies, engine, until)
    print(f"{title}: {len(requests)} requests, {len({r.client for r in requests})} clients, engine {preset}"
          " (simulated; vtc-oracle, if shown, knows true output lengths)")  # fmt: skip
    print(table(rows))
    pngs = plot_runs([r for _, r, _ in rows], title, args.out)
    summary = {name: {"metrics": res.metrics, "per_client": res.per_client} for name, res, _ in rows}
    (args.out / f"fairness-{title}.json").write_text(json.dumps(summary, indent=1, default=float))
    print("wrote", ", ".join(str(p) for p in pngs))


if __name__ == "__main__":
    main()
