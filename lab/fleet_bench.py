"""Gateways in a fleet: two or more `python -m fairness.gateway` processes in front of the same fake engines, with
one shared store (`--state redis://...`) or with independent counters, under skewed ingress; the faults an operator
meets (`--faults`); and the store's growth under rotating tenant names (`--growth N`).

    python -m lab.fleet_bench [--seconds 8] [--scenarios skewed-2,...] [--faults all] [--growth 100000] [--out DIR]

Every tenant is backlogged: it keeps `streams` requests open through each gateway it uses (closed loop, the official
openai client, streaming), so the engines' slots are always all taken (`tests.fleet_harness`). The Redis server, the
engines and the gateways are real processes on loopback; the engines are `tests.fake_engine` (a fixed step time per
token, `max_running` slots, first come first served beyond them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from tests.fleet_harness import (
    DYNAMO,
    ENGINES,
    FAULTS,
    MAX_RUNNING,
    MAX_TOKENS,
    SKEWED,
    STEP_S,
    Tenant,
    fault,
    forget_idle,
    run,
    summary,
)
from tests.servers import free_port, redis_server


def store_cost(n: int = 2000) -> dict:
    """The store's cost per admission: one admit script round trip on loopback (median and p99 of n)."""
    import redis

    from fairness.gateway.store import SharedState

    async def measure(url: str) -> list[float]:
        state = SharedState(url, "bench")
        await state.heartbeat({}, {}, force=True)
        times = []
        for i in range(n):
            await state.join("m", f"t{i % 50}")
            t0 = time.perf_counter()
            await state.admit(i + 1, {"m": ({f"t{i % 50}": 1.0}, {"u0": 1 << 30, "u1": 1 << 30})})
            times.append(time.perf_counter() - t0)
        await state.aclose()
        return sorted(times)

    port = free_port()
    proc = redis_server(port)
    try:
        times = asyncio.run(measure(f"redis://127.0.0.1:{port}"))
        return {"admit_p50_us": times[n // 2] * 1e6, "admit_p99_us": times[int(0.99 * n)] * 1e6,
                "redis": redis.Redis(port=port).info()["redis_version"]}  # fmt: skip
    finally:
        proc.kill()
        proc.wait()


def growth(names: int, batch: int = 64) -> dict:
    """`names` requests through two in-process gateways (`FleetAdmission` objects over a real store, a fresh one per
    case), admitted and finished `batch` at a time, from `names` rotating tenant names and from 10 tenants: the
    store's keys and memory (peak, and after the idle sweep) and the admission rounds' latency."""
    import redis

    from fairness.gateway.fleet import FleetAdmission
    from fairness.gateway.store import SharedState
    from fairness.gateway.upstreams import UpstreamPool

    async def through(url: str, tenants: list[str], prefix: str) -> dict:
        gws = []
        for g in range(2):
            pool = UpstreamPool(["http://a", "http://b"], batch)
            for u in pool.upstreams:
                u.healthy, u.models = True, frozenset({"m"})
            gws.append(FleetAdmission(SharedState(url, f"g{g}", prefix=prefix), "vtc", pool, tenant_idle_s=1.0))
        for g in gws:
            g.sync()
            await g.drained()
        rounds: list[float] = []
        store = redis.Redis.from_url(url)
        peak_keys = peak_memory = 0
        for start in range(0, len(tenants), batch):
            for g in gws:  # a tick's heartbeat: it forgets tenants idle for tenant_idle_s
                g.sync()
            for i, name in enumerate(tenants[start : start + batch]):
                gws[i % 2].arrive(name, 1.0, 10, 5, "m")
            while any(g.waiting or g.running for g in gws):
                for g in gws:
                    t0 = time.perf_counter()
                    g.pump()
                    await g.drained()
                    rounds.append(time.perf_counter() - t0)
                for g in gws:
                    for ticket in list(g.running.values()):
                        g.finish(ticket, 5, 10)
                    g.step()
                    await g.drained()
            if start % (batch * 64) == 0:
                peak_keys = max(peak_keys, store.dbsize())
                peak_memory = max(peak_memory, store.info("memory")["used_memory"])
        waiting_fields = sum(store.hlen(f"{prefix}waiting:g{g}") for g in range(2))
        await asyncio.sleep(1.2)
        await forget_idle(gws, len(tenants))
        keys, memory = store.dbsize(), store.info("memory")["used_memory"]
        for g in gws:
            await g.aclose()
        tenth = len(rounds) // 10

        def p99(xs: list[float]) -> float:
            return 1e6 * sorted(xs)[int(0.99 * len(xs))]

        flat = {"round_p99_first_tenth_us": p99(rounds[:tenth]), "round_p99_last_tenth_us": p99(rounds[-tenth:])}
        rounds.sort()
        return {**flat, "tenants": len(set(tenants)), "requests": len(tenants), "waiting_fields_at_end": waiting_fields,
                "peak_keys": peak_keys, "keys_after_sweep": keys, "peak_used_memory": peak_memory,
                "used_memory_after_sweep": memory,
                "admission_round_p50_us": 1e6 * rounds[len(rounds) // 2],
                "admission_round_p99_us": 1e6 * rounds[int(0.99 * len(rounds))]}  # fmt: skip

    def on_fresh_store(tenants: list[str]) -> dict:
        port = free_port()
        proc = redis_server(port)
        try:
            return asyncio.run(through(f"redis://127.0.0.1:{port}", tenants, "fairness:"))
        finally:
            proc.kill()
            proc.wait()

    few = on_fresh_store([f"tenant-{i % 10}" for i in range(names)])
    many = on_fresh_store([f"rotating-{i}" for i in range(names)])
    return {"ten_tenants": few, "rotating": many,
            "p99_ratio": many["admission_round_p99_us"] / few["admission_round_p99_us"],
            "p99_last_over_first_tenth": many["round_p99_last_tenth_us"] / many["round_p99_first_tenth_us"],
            "peak_keys_ratio": many["peak_keys"] / few["peak_keys"],
            "peak_memory_ratio": many["peak_used_memory"] / few["peak_used_memory"]}  # fmt: skip


SCENARIOS = {  # name: (tenants, gateways)
    "skewed-2": (SKEWED, 2),
    "skewed-3": ([Tenant("heavy", [0, 1, 2]), Tenant("light", [0])], 3),
    "dynamo-4-1": (DYNAMO, 2),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"a subset of {','.join(SCENARIOS)}, or none")
    ap.add_argument("--faults", default="", help=f"a subset of {','.join(FAULTS)}, or all")
    ap.add_argument("--growth", type=int, default=0, help="rotating tenant names through a 2-gateway fleet (0: none)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n and n != "none"]
    faults = list(FAULTS) if args.faults == "all" else [f for f in args.faults.split(",") if f]
    for asked, known in ((names, SCENARIOS), (faults, FAULTS)):
        if set(asked) - set(known):
            raise SystemExit(f"unknown {sorted(set(asked) - set(known))}; choose from {', '.join(known)}")
    rows = []
    for name in names:
        tenants, gateways = SCENARIOS[name]
        weights = {t.name: t.weight for t in tenants}
        for shared in (True, False):
            r, _ = run(tenants, gateways, shared, args.seconds)
            row = {"scenario": name, "gateways": gateways, "state": "redis" if shared else "independent",
                   **summary(r, weights)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"engines": ENGINES, "max_running": MAX_RUNNING, "step_s": STEP_S, "max_tokens": MAX_TOKENS,
              "seconds": args.seconds, "cpus": os.cpu_count(), "rows": rows, "store": store_cost()}  # fmt: skip
    print(json.dumps(result["store"]), flush=True)
    result["faults"] = []
    for kind in faults:
        result["faults"].append(fault(kind))
        print(json.dumps(result["faults"][-1]), flush=True)
    if args.growth:
        result["growth"] = growth(args.growth)
        print(json.dumps(result["growth"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'fleet.json'}")


if __name__ == "__main__":
    main()
