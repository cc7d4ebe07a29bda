"""The real-engine part of `make bench`: the reference model served in-process over HTTP (`fairness.serve`, unpatched
and offloaded), an overload scaled to this machine's measured capacity replayed with the official `openai` client
(`lab.loadgen`) under FCFS, VTC and Equinox; then the simulator, its engine model fitted to the same engine's
measured step times, on the same requests: a sim-vs-real table with the error of each metric.

Both sides are measured by one function (`records.record_metrics`) over the same window.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fairness.core.engine_model import EngineModel
from fairness.core.request import Request
from fairness.measure.records import record_metrics
from fairness.serve import BackgroundServer, build_engine
from fairness.serving.server import create_app
from fairness.sim.simulator import simulate
from lab.loadgen import as_result, replay
from lab.reference import REFERENCE_MODEL

POLICIES = ("fcfs", "vtc", "equinox")
SHARES = {"heavy": 4.0, "light-a": 1.0, "light-b": 1.0}  # one client sends four times each light one's share
PROMPT, OUTPUT = 48, 48  # tokens per request
COMPARED = ("max_service_diff", "ttft_p50_s", "e2e_p50_s", "throughput_tok_s")


def measure_capacity(model_dir: Path, offload: dict | None, max_running: int, waves: int = 4) -> float:
    """Output tokens/s of the engine kept busy: `waves x max_running` requests at once."""
    engine = build_engine(model_dir, "fcfs", device="cpu", max_running=max_running, **(offload or {}))
    srv = BackgroundServer(create_app(engine, max_tokens_limit=OUTPUT))
    url = srv.start()
    try:
        burst = [Request("probe", 0.0, PROMPT, OUTPUT) for _ in range(waves * max_running)]
        records = asyncio.run(replay(url, engine.model_name, burst, timeout_s=300))
    finally:
        srv.stop()
    done = [r for r in records if r.finish_s is not None]
    return sum(r.output_tokens for r in done) / max(r.finish_s for r in done)


def overload(capacity_tok_s: float, load: float, duration_s: float) -> list[Request]:
    """Uniform arrivals at `load` x capacity in all, split by SHARES, offset so that clients do not tie."""
    total_rate = load * capacity_tok_s / OUTPUT  # requests/s
    shares = sum(SHARES.values())
    reqs = []
    for k, (client, share) in enumerate(SHARES.items()):
        rate = total_rate * share / shares
        reqs += [Request(client, 0.05 * k + i / rate, PROMPT, OUTPUT) for i in range(int(duration_s * rate))]
    return sorted(reqs, key=lambda r: r.arrival_s)


def serve_once(model_dir: Path, policy: str, requests: list[Request], stop_at: float, offload: dict | None,
               max_running: int):  # fmt: skip
    """Serve `requests` under `policy` until `stop_at` seconds; (records, the engine model fitted to its steps)."""
    engine = build_engine(model_dir, policy, device="cpu", max_running=max_running, **(offload or {}))
    srv = BackgroundServer(create_app(engine, max_tokens_limit=OUTPUT, drain_s=0.0))
    url = srv.start()
    try:
        records = asyncio.run(replay(url, engine.model_name, requests, stop_at_s=stop_at))
        model = engine.engine_model()
        steps = list(engine.steps)
    finally:
        srv.stop()
    return records, model, steps


def run_served_bench(out: Path, model_dir: Path, mode: str = "default") -> dict:
    """Measure, serve, simulate, compare; writes served.json and plots into `out`. mode "quick": unpatched, FCFS and
    VTC, 6 s windows; "default": the offloaded model (budget 1/2), FCFS, VTC and Equinox, 24 s; "full": both."""
    if mode not in ("quick", "default", "full"):
        raise ValueError(f"unknown served bench mode {mode!r}; choose quick, default or full")
    quick = mode == "quick"
    from lab.fairness_plots import plot_runs

    out.mkdir(parents=True, exist_ok=True)
    duration, load, max_running = (6.0, 1.6, 4) if quick else (24.0, 1.8, 6)
    configs = {"unpatched": None, "offloaded-0.5": {"offload_budget": 0.5}}
    configs = {k: v for k, v in configs.items() if mode == "full" or (k == "unpatched") == quick}
    policies = POLICIES[:2] if quick else POLICIES
    summary: dict = {"served": True, "device": "cpu", "window_s": duration, "load": load, "shares": SHARES,
                     "prompt_tokens": PROMPT, "output_tokens": OUTPUT, "configs": {}}  # fmt: skip
    for label, offload in configs.items():
        t0 = time.perf_counter()
        capacity = measure_capacity(model_dir, offload, max_running)
        requests = overload(capacity, load, duration)
        runs, steps, served_engine = {}, [], None
        for policy in policies:
            records, served_engine, measured = serve_once(model_dir, policy, requests, duration, offload, max_running)
            runs[policy] = records
            steps += measured
        capacity_limits = {"kv_tokens": served_engine.kv_tokens, "max_step_tokens": served_engine.max_step_tokens}
        real_engine = EngineModel.fit(steps, **capacity_limits, max_running=max_running)
        rows = {}
        for policy in policies:
            real = record_metrics(runs[policy], end_s=duration)
            sim = simulate(requests, policy, engine=real_engine, until_s=duration)
            simulated = record_metrics(sim.records, end_s=duration)
            rows[policy] = {"real": real.metrics, "sim": simulated.metrics,
                            "error": {k: relative_error(simulated.metrics[k], real.metrics[k]) for k in COMPARED},
                            "real_per_client": real.per_client}  # fmt: skip
            plot_runs([as_result(f"{policy} served", real), as_result(f"{policy} simulated", simulated)],
                      f"served-{label}-{policy}", out)  # fmt: skip
        summary["configs"][label] = {"capacity_tok_s": capacity, "requests": len(requests),
                                     "engine_model": real_engine.__dict__, "runs": rows,
                                     "seconds": time.perf_counter() - t0}  # fmt: skip
        print(table(label, capacity, rows))
    (out / "served.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"wrote {out / 'served.json'} (REAL engine on this CPU, simulator fitted to its measured steps)")
    return summary


def relative_error(sim: float, real: float) -> float:
    return abs(sim - real) / abs(real) if real else float("inf") if sim else 0.0


def table(label: str, capacity: float, rows: dict) -> str:
    lines = [f"\nserved ({label}, REAL engine, capacity {capacity:.0f} tok/s) vs simulated (engine model fitted to the "
             "measured steps), same requests and window"]  # fmt: skip
    head = f"{'policy':<10}" + "".join(f"{k:>24}" for k in COMPARED)
    lines += [head, "-" * len(head)]
    for policy, r in rows.items():
        cells = "".join(f"{r['real'][k]:>9.2f} /{r['sim'][k]:>7.2f} {100 * r['error'][k]:>4.0f}%" for k in COMPARED)
        lines.append(f"{policy:<10}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="The served (real engine) part of make bench.")
    ap.add_argument("--model", type=Path, default=REFERENCE_MODEL)
    ap.add_argument("--mode", choices=["quick", "default", "full"], default="default", help="see run_served_bench")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model directory; run from the repository root or pass --model")
    run_served_bench(args.out, args.model, args.mode)


if __name__ == "__main__":
    main()
