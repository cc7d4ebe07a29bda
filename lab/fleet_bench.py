"""Gateways in a fleet: two or more `python -m fairness.gateway` processes in front of the same fake engines, with
one shared store (`--state redis://...`) or with independent counters, under skewed ingress.

    python -m lab.fleet_bench [--seconds 8] [--out bench-results]

Every tenant is backlogged: it keeps `streams` requests open through each gateway it uses (closed loop, the official
openai client, streaming), so the engines' slots are always all taken. Service is counted in VTC's terms (prompt
tokens + 2 x completion tokens) for requests that finish inside the measured window; a tenant's fair share is its
weight over the sum of the weights.
The Redis server, the engines and the gateways are real processes on loopback; the engines are `lab.fake_engine`
(a fixed step time per token, `max_running` slots, first come first served beyond them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from lab.gateway_bench import free_port, spawn

ENGINES, MAX_RUNNING, STEP_S, MAX_TOKENS = 3, 4, 0.01, 20
MODEL = "fake"


@dataclass
class Tenant:
    name: str
    gateways: list[int]  # which gateways it sends through
    weight: float = 1.0
    streams: int = 2 * ENGINES * MAX_RUNNING  # open requests per gateway: twice the slots, so it always waits


@dataclass
class Run:
    """What one scenario measured."""

    service: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # prompt + 2 x completion tokens
    ok: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # gateway -> requests completed
    errors: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # gateway -> errors
    ttft: list[float] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0
    state_down_seen: bool = False

    def shares(self, weights: dict[str, float]) -> dict[str, float]:
        total = sum(self.service.values())
        return {t: self.service[t] / total if total else 0.0 for t in weights}


def redis_server(port: int, persist: Path | None = None) -> subprocess.Popen:
    """`redis-server` on 127.0.0.1:port (no persistence unless `persist`, a directory for its AOF)."""
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        raise RuntimeError("no redis-server or valkey-server on PATH: apt-get install redis-server")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "yes", "--dir", str(persist)] if persist else ["--appendonly", "no"]
    import redis

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port, socket_timeout=0.2).ping():
                return proc
        except redis.RedisError:  # not up yet
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@dataclass(frozen=True)
class Engines:
    """The fake engines behind the gateways and the gateways' limit per engine (None: learned)."""

    count: int = ENGINES
    args: tuple[str, ...] = ("--max-running", str(MAX_RUNNING), "--step-s", str(STEP_S))
    limit: int | None = MAX_RUNNING


@contextlib.contextmanager
def fleet(
    n_gateways: int,
    shared: bool,
    tenants_file: Path | None,
    engines: Engines = Engines(),
    gateway_args: tuple[str, ...] = (),
) -> Iterator[tuple[list[str], dict]]:
    """Engines, a store when `shared`, and `n_gateways` gateways (with `gateway_args`); yields (gateway URLs,
    handles to the processes)."""
    procs: dict[str, subprocess.Popen] = {}
    redis_port = free_port()
    try:
        upstreams = []
        for i in range(engines.count):
            port = free_port()
            procs[f"engine{i}"] = spawn(["lab.fake_engine", *engines.args], port)
            upstreams.append(f"http://127.0.0.1:{port}")
        if shared:
            procs["redis"] = redis_server(redis_port)
        urls = []
        for g in range(n_gateways):
            port = free_port()
            args = ["fairness.gateway", "--policy", "vtc", "--probe-interval", "0.2"]
            args += ["--limit", str(engines.limit)] if engines.limit else []
            args += [x for e in upstreams for x in ("--upstream", e)]
            if shared:
                args += ["--state", f"redis://127.0.0.1:{redis_port}", "--gateway-id", f"g{g}"]
            if tenants_file is not None:
                args += ["--tenants", str(tenants_file)]
            args += gateway_args
            procs[f"gateway{g}"] = spawn(args, port)
            urls.append(f"http://127.0.0.1:{port}")
        yield urls, {"procs": procs, "redis_port": redis_port}
    finally:
        for p in procs.values():
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(10)


def run(
    tenants: list[Tenant],
    n_gateways: int = 2,
    shared: bool = True,
    seconds: float = 8.0,
    warmup_s: float = 2.0,
    kill_gateway_at: float | None = None,
    restart_store: tuple[float, float] | None = None,
    measure_from: float | None = None,
    engines: Engines = Engines(),
) -> Run:
    """One scenario: `tenants` backlogged through their gateways for `seconds`; service counted from `warmup_s` (or
    `measure_from`) on. kill_gateway_at: SIGKILL the last gateway then. restart_store: (stop at, start at).
    engines: what the gateways front."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = None
        if any(t.weight != 1.0 for t in tenants):
            keys = Path(tmp) / "tenants.json"
            keys.write_text(json.dumps({f"key-{t.name}": {"name": t.name, "weight": t.weight} for t in tenants}))
        with fleet(n_gateways, shared, keys, engines) as (urls, handles):
            procs, out = handles["procs"], Run()
            events: list[tuple[float, Callable[[], None]]] = []
            if kill_gateway_at is not None:
                events.append((kill_gateway_at, lambda: procs[f"gateway{n_gateways - 1}"].send_signal(signal.SIGKILL)))
            if restart_store is not None:

                def store_down() -> None:
                    procs["redis"].send_signal(signal.SIGKILL)
                    procs["redis"].wait()
                    time.sleep(0.6)
                    out.state_down_seen = _metric(urls[0], "fairness_gateway_shared_state_up") == 0.0

                def store_up() -> None:
                    procs["redis"] = redis_server(handles["redis_port"])

                events += [(restart_store[0], store_down), (restart_store[1], store_up)]
            killed = {n_gateways - 1} if kill_gateway_at is not None else set()
            return drive(urls, tenants, seconds, measure_from if measure_from is not None else warmup_s, out,
                         keyed=keys is not None, events=events, stop_after_error=killed)  # fmt: skip


def drive(
    urls: list[str],
    tenants: list[Tenant],
    seconds: float,
    measure_from: float,
    out: Run | None = None,
    keyed: bool = False,
    events: list[tuple[float, Callable[[], None]]] = (),
    stop_after_error: set[int] = frozenset(),
    model: str = MODEL,
    prompt: str = "x",
    max_tokens: int = MAX_TOKENS,
) -> Run:
    """Each tenant's streams, closed loop through its gateways (`urls`) for `seconds`, counting service from
    `measure_from`; `events` run at their times. keyed: tenants authenticate as `key-<name>`, else name themselves
    in `user`. stop_after_error: gateways whose clients stop at their first error (after a kill)."""
    out = out or Run()
    start = time.monotonic()
    window = (start + measure_from, start + seconds)
    lock = threading.Lock()

    def stream(tenant: Tenant, g: int) -> None:
        client = openai.OpenAI(base_url=urls[g] + "/v1", api_key=f"key-{tenant.name}" if keyed else "none",
                               max_retries=0, timeout=60)  # fmt: skip
        while time.monotonic() < start + seconds:
            t0 = time.monotonic()
            try:
                first, usage = None, None
                for chunk in client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    stream=True,
                    user=tenant.name,
                    stream_options={"include_usage": True},
                ):
                    first = first or time.monotonic()
                    usage = chunk.usage or usage
            except (openai.APIError, httpx.HTTPError) as e:
                with lock:
                    out.errors[g].append(f"{type(e).__name__}: {e}"[:200])
                if g in stop_after_error:  # its gateway is gone: the client stops (or fails over, elsewhere)
                    return
                time.sleep(0.05)
                continue
            end = time.monotonic()
            with lock:
                out.ok[g] += 1
                if window[0] <= end <= window[1] and usage is not None:
                    out.service[tenant.name] += usage.prompt_tokens + 2 * usage.completion_tokens
                    out.requests += 1
                    if first is not None:
                        out.ttft.append(first - t0)

    threads = [threading.Thread(target=stream, args=(t, g), daemon=True)
               for t in tenants for g in t.gateways for _ in range(t.streams)]  # fmt: skip
    for th in threads:
        th.start()
    for at, event in sorted(events, key=lambda e: e[0]):
        time.sleep(max(0.0, start + at - time.monotonic()))
        event()
    for th in threads:
        th.join(120)
    out.seconds = window[1] - window[0]
    return out


def _metric(url: str, name: str) -> float | None:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def summary(r: Run, weights: dict[str, float]) -> dict:
    """Shares, the largest difference between the tenants' weighted services, Jain's index of the weighted services,
    throughput, TTFT."""
    services = [r.service[t] / w for t, w in weights.items()]
    jain = sum(services) ** 2 / (len(services) * sum(s * s for s in services)) if any(services) else 0.0
    ttft = sorted(r.ttft)
    return {
        "shares": r.shares(weights),
        "fair_shares": {t: w / sum(weights.values()) for t, w in weights.items()},
        "max_service_difference": max(services) - min(services),
        "jain": jain,
        "requests_per_s": r.requests / r.seconds if r.seconds else 0.0,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
        "errors": {g: len(e) for g, e in r.errors.items()},
    }


def store_cost(n: int = 2000) -> dict:
    """The store's cost per admission: one admit script round trip on loopback (median and p99 of n)."""
    import redis

    from fairness.gateway.fleet import SharedState

    port = free_port()
    proc = redis_server(port)
    try:
        state = SharedState(f"redis://127.0.0.1:{port}", "bench")
        state.heartbeat({}, {})
        times = []
        for i in range(n):
            state.join(f"t{i % 50}")
            t0 = time.perf_counter()
            state.admit({f"t{i % 50}": 1.0}, {"u0": 1 << 30, "u1": 1 << 30})
            times.append(time.perf_counter() - t0)
        times.sort()
        return {"admit_p50_us": times[n // 2] * 1e6, "admit_p99_us": times[int(0.99 * n)] * 1e6,
                "redis": redis.Redis(port=port).info()["redis_version"]}  # fmt: skip
    finally:
        proc.kill()
        proc.wait()


SKEWED = [Tenant("heavy", [0, 1]), Tenant("light", [0])]  # the light tenant reaches gateway A only
DYNAMO = [Tenant("x", [0], weight=4.0), Tenant("y", [1], weight=1.0)]  # DEP #15187: 4:1, one router each


SCENARIOS = {  # name: (tenants, gateways)
    "skewed-2": (SKEWED, 2),
    "skewed-3": ([Tenant("heavy", [0, 1, 2]), Tenant("light", [0])], 3),
    "dynamo-4-1": (DYNAMO, 2),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"a subset of {','.join(SCENARIOS)}")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    names = args.scenarios.split(",")
    if set(names) - set(SCENARIOS):
        raise SystemExit(f"unknown scenarios {sorted(set(names) - set(SCENARIOS))}; choose from {', '.join(SCENARIOS)}")
    rows = []
    for name in names:
        tenants, gateways = SCENARIOS[name]
        weights = {t.name: t.weight for t in tenants}
        for shared in (True, False):
            r = run(tenants, gateways, shared, args.seconds)
            row = {"scenario": name, "gateways": gateways, "state": "redis" if shared else "independent",
                   **summary(r, weights)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"engines": ENGINES, "max_running": MAX_RUNNING, "step_s": STEP_S, "max_tokens": MAX_TOKENS,
              "seconds": args.seconds, "cpus": os.cpu_count(), "rows": rows, "store": store_cost()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["store"]))
    print(f"wrote {args.out / 'fleet.json'}")


if __name__ == "__main__":
    main()
