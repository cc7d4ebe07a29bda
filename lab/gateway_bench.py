"""The gateway on the real stack here: three `fairness.serve` replicas of the reference model, a heavy tenant and two
light ones in overload, arriving in a pattern that round-robin spreads unevenly (H, H, A, H, H, B, ...: the light
tenants' requests all land on one replica). Compared on the same requests and window:
  (a) `python -m fairness.gateway` (its own process) with one VTC counter for the three replicas (the replicas run
      FCFS; the gateway's limit per replica keeps them from queueing internally),
  (b) round-robin to replicas each running their own VTC,
  (c) round-robin to FCFS replicas.
Then the gateway's own cost: TTFT through it minus TTFT direct at low load, and the requests/s it sustains in front
of fast (fake) upstreams. Writes gateway.json.

    python -m lab.gateway_bench [--mode quick|default] [--out bench-results]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from fairness.core.request import Request
from fairness.measure.bound import vtc_bound
from fairness.measure.metrics import percentile
from fairness.measure.records import record_metrics
from fairness.serve import BackgroundServer, build_engine
from fairness.serving.server import create_app
from lab.loadgen import replay
from lab.reference import REFERENCE_MODEL
from lab.served_bench import OUTPUT, PROMPT, measure_capacity
from tests.fake_engine import MODEL as FAKE
from tests.servers import free_port, process

REPLICAS, MAX_RUNNING = 3, 4
PATTERN = ("heavy", "heavy", "light-a", "heavy", "heavy", "light-b")  # round-robin puts every light one on replica 2
SETUPS = ("gateway-vtc", "rr-vtc", "rr-fcfs")


def workload(capacity_tok_s: float, load: float, duration_s: float) -> list[Request]:
    """Arrivals at `load` x the three replicas' capacity, in PATTERN's order (each light tenant: 1/6 of them)."""
    rate = load * capacity_tok_s / OUTPUT
    n = int(duration_s * rate)
    return [Request(PATTERN[i % len(PATTERN)], i / rate, PROMPT, OUTPUT) for i in range(n)]


@contextlib.contextmanager
def _replicas(model_dir: Path, policy: str, n: int = REPLICAS) -> Iterator[list[str]]:
    """`n` `fairness.serve` replicas in this process, stopped on exit; yields their URLs."""
    servers: list[BackgroundServer] = []  # the started ones
    urls = []
    try:
        for _ in range(n):
            engine = build_engine(model_dir, policy, device="cpu", max_running=MAX_RUNNING)
            server = BackgroundServer(create_app(engine, max_tokens_limit=OUTPUT, drain_s=0.0))
            urls.append(server.start())
            servers.append(server)
        yield urls
    finally:
        for s in servers:
            s.stop()


async def _round_robin(urls: list[str], model: str, requests: list[Request], stop_at: float):
    """What a plain load balancer does: request i to replica i mod N."""
    parts = [requests[k :: len(urls)] for k in range(len(urls))]
    runs = await asyncio.gather(*(replay(u, model, p, stop_at_s=stop_at) for u, p in zip(urls, parts, strict=True)))
    return [r for run in runs for r in run]


def serve_setup(model_dir: Path, setup: str, requests: list[Request], duration: float) -> dict:
    with _replicas(model_dir, "fcfs" if setup != "rr-vtc" else "vtc") as urls:
        if setup == "gateway-vtc":
            with gateway_process(urls) as url:
                records = asyncio.run(replay(url, REFERENCE_MODEL.name, requests, stop_at_s=duration))
        else:
            records = asyncio.run(_round_robin(urls, REFERENCE_MODEL.name, requests, duration))
    m = record_metrics(records, end_s=duration)
    total = sum(c["service"] for c in m.per_client.values())
    return {"max_service_diff": m.metrics["max_service_diff"], "throughput_tok_s": m.metrics["throughput_tok_s"],
            "share": {c: v["service"] / total for c, v in m.per_client.items()},
            "ttft_p50_s": {c: v["ttft_p50_s"] for c, v in m.per_client.items()},
            "ttft_p99_s": {c: percentile(v, 99) for c, v in m.ttft.items()}}  # fmt: skip


def gateway_overhead(model_dir: Path, n: int = 30) -> dict:
    """Median TTFT of `n` sequential streamed requests direct to a replica and through the gateway (low load)."""

    def ttft(url: str) -> float:
        t0 = time.perf_counter()
        body = {"model": REFERENCE_MODEL.name, "prompt": [5] * PROMPT, "max_tokens": 4, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            took = time.perf_counter() - t0
            for _ in lines:
                pass
        assert first
        return took

    with _replicas(model_dir, "fcfs", n=1) as urls, gateway_process(urls) as through:
        direct, via = [], []
        for _ in range(n):  # interleaved, so drift hits both alike
            direct.append(ttft(urls[0]))
            via.append(ttft(through))
    return {"requests": n, "direct_ttft_p50_ms": 1e3 * statistics.median(direct),
            "gateway_ttft_p50_ms": 1e3 * statistics.median(via),
            "added_ttft_p50_ms": 1e3 * (statistics.median(via) - statistics.median(direct))}  # fmt: skip


@contextlib.contextmanager
def gateway_process(upstreams: list[str], limit: int = MAX_RUNNING) -> Iterator[str]:
    """`python -m fairness.gateway` in its own process, as users run it, stopped on exit; yields its base URL."""
    port = free_port()
    args = ["fairness.gateway", "--policy", "vtc", "--limit", str(limit)]
    for u in upstreams:
        args += ["--upstream", u]
    with process(args, port):
        yield f"http://127.0.0.1:{port}"


def gateway_throughput(seconds: float = 5.0, concurrency: int = 64) -> dict:
    """Requests/s through `python -m fairness.gateway` (its own process) in front of a fake engine that answers at
    once (8 tokens), driven by `concurrency` clients in this process: the three share this machine's 2 cores."""
    fake_port = free_port()

    async def load(url: str) -> tuple[int, int]:
        done = errors = 0
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:

            async def worker(i: int) -> None:
                nonlocal done, errors
                body = {"model": FAKE, "prompt": "x", "max_tokens": 8, "user": f"t{i % 16}"}
                while time.monotonic() < deadline:
                    r = await client.post(url + "/v1/completions", json=body)
                    done, errors = done + (r.status_code == 200), errors + (r.status_code != 200)

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return done, errors

    fake = ["tests.fake_engine", "--max-running", "4096", "--step-s", "0"]
    with process(fake, fake_port), gateway_process([f"http://127.0.0.1:{fake_port}"], limit=4096) as url:
        t0 = time.perf_counter()
        done, errors = asyncio.run(load(url))
        took = time.perf_counter() - t0
    return {"requests": done, "errors": errors, "seconds": took, "requests_per_s": done / took,
            "concurrency": concurrency}  # fmt: skip


def run_gateway_bench(out: Path, model_dir: Path, mode: str = "default") -> dict:
    if mode not in ("quick", "default"):
        raise ValueError(f"unknown gateway bench mode {mode!r}; choose quick or default")
    duration, load = (8.0, 2.4) if mode == "quick" else (15.0, 2.4)  # 15 s: make bench's 10-minute limit
    out.mkdir(parents=True, exist_ok=True)
    capacity = REPLICAS * measure_capacity(model_dir, None, MAX_RUNNING)  # one replica alone, times three
    requests = workload(capacity, load, duration)
    summary: dict = {"served": True, "device": "cpu", "replicas": REPLICAS, "max_running": MAX_RUNNING,
                     "window_s": duration, "load": load, "pattern": PATTERN, "capacity_tok_s": capacity,
                     "requests": len(requests), "setups": {},
                     # VTC's 2U with M = the most tokens the gateway lets run at once (its limits x a request's tokens)
                     "vtc_bound": vtc_bound(requests, REPLICAS * MAX_RUNNING * (PROMPT + OUTPUT))}  # fmt: skip
    summary["overhead"] = gateway_overhead(model_dir, 10 if mode == "quick" else 30)  # also warms the process up
    repeats = 1 if mode == "quick" else 2
    runs: dict[str, list[dict]] = {setup: [] for setup in SETUPS}
    for k in range(repeats):  # each repeat in the reverse order of the last: drift hits every setup alike
        for setup in SETUPS if k % 2 == 0 else SETUPS[::-1]:
            runs[setup].append(serve_setup(model_dir, setup, requests, duration))
    summary["repeats"] = repeats
    summary["setups"] = {setup: _mean(r) for setup, r in runs.items()}
    summary["throughput"] = gateway_throughput(2.0 if mode == "quick" else 5.0)
    (out / "gateway.json").write_text(json.dumps(summary, indent=1, default=float))
    print(table(summary))
    print(f"wrote {out / 'gateway.json'} (REAL engines on this CPU: three replicas share its 2 cores)")
    return summary


def _mean(runs: list[dict]) -> dict:
    """Each measure averaged over the runs (per tenant where it is per tenant); each run's throughput kept."""
    out = {k: (sum(r[k] for r in runs) / len(runs) if not isinstance(v, dict)
               else {c: sum(r[k][c] for r in runs) / len(runs) for c in v}) for k, v in runs[0].items()}  # fmt: skip
    out["throughput_runs"] = [r["throughput_tok_s"] for r in runs]
    return out


def table(s: dict) -> str:
    lines = [f"\ngateway: {s['replicas']} fairness.serve replicas (REAL, CPU), {s['load']}x overload, "
             f"{s['window_s']:g} s, mean of {s['repeats']} runs; fair share: 1/3 each; "
             f"VTC's 2U: {s['vtc_bound']:.0f}"]  # fmt: skip
    head = f"{'setup':<12}{'max diff':>10}{'tok/s':>8}" + "".join(f"{c + ' share':>15}" for c in sorted(set(PATTERN)))
    head += "".join(f"{c + ' TTFT p50/p99':>24}" for c in sorted(set(PATTERN)))
    lines += [head, "-" * len(head)]
    for name, r in s["setups"].items():
        cells = "".join(f"{r['share'].get(c, 0):>15.2f}" for c in sorted(set(PATTERN)))
        cells += "".join(
            f"{r['ttft_p50_s'].get(c, 0):>16.2f}/{r['ttft_p99_s'].get(c, 0):<7.2f}" for c in sorted(set(PATTERN))
        )
        runs = ", ".join(f"{x:.0f}" for x in r["throughput_runs"])
        lines.append(
            f"{name:<12}{r['max_service_diff']:>10.0f}{r['throughput_tok_s']:>8.0f}{cells}   tok/s runs: {runs}"
        )
    o, t = s["overhead"], s["throughput"]
    lines.append(f"gateway cost: TTFT p50 {o['direct_ttft_p50_ms']:.1f} ms direct, {o['gateway_ttft_p50_ms']:.1f} ms "
                 f"through it (+{o['added_ttft_p50_ms']:.1f} ms); {t['requests_per_s']:.0f} requests/s in front of "
                 f"fake upstreams ({t['errors']} errors)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="The gateway on three real replicas.")
    ap.add_argument("--model", type=Path, default=REFERENCE_MODEL)
    ap.add_argument("--mode", choices=["quick", "default"], default="default")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    run_gateway_bench(args.out, args.model, args.mode)


if __name__ == "__main__":
    main()
