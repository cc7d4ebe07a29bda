"""A soak of the gateway: two `fairness.serve` replicas of the reference model behind `fairness.gateway`, clients
sending streamed and whole requests for `--seconds`, a share of them leaving early (mid-stream, or before a whole
answer comes). Afterwards nothing may be left behind: no request queued or running at the gateway or in an engine,
no request in flight to an upstream, every KV block free, every gauge at zero. Writes soak.json.

    python -m lab.gateway_soak --seconds 180
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fairness.gateway import create_gateway
from fairness.serve import BackgroundServer, build_engine
from fairness.serving.server import create_app
from lab.reference import REFERENCE_MODEL


def _gauges(url: str, prefix: str) -> dict[str, float]:
    """Sum of each gauge named `prefix*` over its labels."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if fam.name.startswith(prefix) and fam.type == "gauge" and not fam.name.endswith("_created"):
            out[fam.name] = sum(s.value for s in fam.samples)
    return out


async def _clients(url: str, model: str, seconds: float, concurrency: int, leave: float, seed: int) -> dict:
    rng = random.Random(seed)
    counts = {"ok": 0, "left": 0, "error": 0}
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(i: int) -> None:
            body = {"model": model, "prompt": [3 + i % 90] * rng.randint(4, 40), "max_tokens": rng.randint(4, 48),
                    "user": f"tenant-{rng.randint(0, 5)}", "ignore_eos": True,
                    "stream": rng.random() < 0.7}  # fmt: skip
            quit_after = rng.randint(1, 6) if rng.random() < leave else None
            try:
                if body["stream"]:
                    async with client.stream("POST", url + "/v1/completions", json=body) as r:
                        events = 0
                        async for line in r.aiter_lines():
                            events += line.startswith("data:")
                            if quit_after is not None and events >= quit_after:
                                counts["left"] += 1
                                return  # closes the connection mid-stream
                        counts["ok" if r.status_code == 200 else "error"] += 1
                elif quit_after is not None:
                    await asyncio.wait_for(client.post(url + "/v1/completions", json=body), 0.05 * quit_after)
                    counts["ok"] += 1
                else:
                    r = await client.post(url + "/v1/completions", json=body)
                    counts["ok" if r.status_code == 200 else "error"] += 1
            except asyncio.TimeoutError:
                counts["left"] += 1  # gave up waiting: the connection is dropped

        async def worker(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                await one(i)
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return counts


def soak(seconds: float = 180.0, concurrency: int = 8, leave: float = 0.3, seed: int = 0,
         model_dir: Path = REFERENCE_MODEL) -> dict:  # fmt: skip
    engines = [build_engine(model_dir, "vtc", device="cpu", max_running=4),
               build_engine(model_dir, "vtc", device="cpu", max_running=4, offload_budget=0.5)]  # fmt: skip
    servers = [BackgroundServer(create_app(e, max_tokens_limit=64)) for e in engines]
    urls = [s.start() for s in servers]
    app = create_gateway(urls, "vtc", limit=4, probe_s=0.5)
    gw = BackgroundServer(app)
    url = gw.start()
    try:
        t0 = time.monotonic()
        counts = asyncio.run(_clients(url, engines[0].model_name, seconds, concurrency, leave, seed))
        took = time.monotonic() - t0
        state = app.state.gateway
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # what is still closing settles
            busy = state.admission.running or state.admission.waiting or any(u.in_flight for u in state.pool.upstreams)
            held = [e.occupancy() for e in engines]
            if not busy and not any(h["streams"] or h["running"] or h["waiting"] for h in held):
                break
            time.sleep(0.1)
        report = {
            "seconds": took, "concurrency": concurrency, "leave": leave, "requests": counts,
            "gateway": {"waiting": len(state.admission.waiting), "running": len(state.admission.running),
                        "in_flight": [u.in_flight for u in state.pool.upstreams],
                        "gauges": _gauges(url, "fairness_gateway_")},
            "engines": [{**e.occupancy(), "gauges": _gauges(u, "fairness_requests_")} for e, u in zip(engines, urls,
                                                                                                    strict=True)],
        }  # fmt: skip
    finally:
        gw.stop()
        for s in servers:
            s.stop()
    return report


def left_behind(report: dict) -> list[str]:
    """What the soak left behind (empty: nothing)."""
    g, out = report["gateway"], []
    if g["waiting"] or g["running"] or any(g["in_flight"]):
        out.append(f"gateway holds requests: {g}")
    out += [f"gateway gauge {k} = {v}" for k, v in g["gauges"].items() if k != "fairness_gateway_upstream_limit"
            and k != "fairness_gateway_upstream_healthy" and v]  # fmt: skip
    for i, e in enumerate(report["engines"]):
        if e["streams"] or e["running"] or e["waiting"] or e["kv_free"] < 1.0:
            out.append(f"engine {i} holds: {e}")
        out += [f"engine {i} gauge {k} = {v}" for k, v in e["gauges"].items() if v]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Soak the gateway with clients that leave early.")
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    report = soak(args.seconds, args.concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    problems = left_behind(report)
    print(f"soak: {report['seconds']:.0f} s, requests {report['requests']}; left behind: {problems or 'nothing'}")
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
