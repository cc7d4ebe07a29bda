"""Gateways in a fleet as users run them, for the fleet's tests and `lab.fleet_bench`: fake engines, a Redis server
(each gateway reaching it through its own `TcpProxy`, so one can be slowed or cut off), `python -m fairness.gateway`
processes with `--state`, and backlogged tenants driving them with the official openai client. Every process is real
and on loopback.

Service is counted in VTC's terms (prompt tokens + 2 x completion tokens, from the usage each response reports); a
tenant's fair share is its weight over the sum of the weights.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from tests.servers import free_port, redis_server, spawn_all
from tests.tcp_proxy import ProxyProcess

ENGINES, MAX_RUNNING, STEP_S, MAX_TOKENS = 3, 4, 0.01, 20
MODEL = "fake"
TICK_S = 0.05  # the gateway's admission tick: output tokens reach the store once a tick
STREAMS_PER_PROCESS = 12  # a tenant's client threads per process


async def forget_idle(gateways: list, tenants: int) -> None:
    """Heartbeat every in-process `FleetAdmission` a tick apart until the store has forgotten `tenants` idle
    tenants (each heartbeat forgets up to 256)."""
    import asyncio

    for _ in range(tenants // 256 + 2):
        for g in gateways:
            g.sync()
            await g.drained()
        await asyncio.sleep(gateways[0].tick_s)  # a heartbeat a tick


@dataclass
class Tenant:
    name: str
    gateways: list[int]  # which gateways it sends through
    weight: float = 1.0
    streams: int = 2 * ENGINES * MAX_RUNNING  # open requests per gateway: twice the slots, so it always waits


@dataclass(frozen=True)
class Done:
    """One completed request: its tenant, when it was sent and ended (monotonic s), and its service."""

    tenant: str
    sent: float
    ended: float
    service: float


@dataclass
class Run:
    """What one scenario measured."""

    service: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # in the measured window
    ok: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # gateway -> requests completed
    errors: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # gateway -> errors
    done: list[Done] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0
    lost: int = 0  # requests neither answered nor refused when the run ended (a client still waiting)
    start: float = 0.0
    state_down_seen: bool = False

    def shares(self, weights: dict[str, float]) -> dict[str, float]:
        total = sum(self.service.values())
        return {t: self.service[t] / total if total else 0.0 for t in weights}

    def shares_between(self, t0: float, t1: float) -> dict[str, float]:
        """Each tenant's share of the service of the requests that ended between t0 and t1 (seconds from the start)."""
        out: dict[str, float] = defaultdict(float)
        for d in self.done:
            if t0 <= d.ended - self.start <= t1:
                out[d.tenant] += d.service
        total = sum(out.values())
        return {t: v / total for t, v in out.items()} if total else {}

    def usage(self, ended_after: float = 0.0, sent_after: float = 0.0) -> dict[str, float]:
        """Service of the completed requests sent and ended after these times (seconds from the start)."""
        out: dict[str, float] = defaultdict(float)
        for d in self.done:
            if d.ended - self.start >= ended_after and d.sent - self.start >= sent_after:
                out[d.tenant] += d.service
        return out


@dataclass(frozen=True)
class Engines:
    """The fake engines behind the gateways and the gateways' limit per engine (None: learned)."""

    count: int = ENGINES
    args: tuple[str, ...] = ("--max-running", str(MAX_RUNNING), "--step-s", str(STEP_S))
    limit: int | None = MAX_RUNNING


class Fleet:
    """The processes of one fleet; `shared`: gateways share a store; `proxied`: each reaches it through a proxy of
    its own (`ProxyProcess`), which a fault can slow or cut."""

    def __init__(self, n_gateways: int, shared: bool, tenants_file: Path | None, engines: Engines,
                 gateway_args: tuple[str, ...] = (), proxied: bool = False):  # fmt: skip
        self.procs: dict[str, subprocess.Popen] = {}
        self.proxies: list[ProxyProcess] = []
        self.redis_port = free_port()
        self.urls: list[str] = []
        self._args: list[list[str]] = []
        ports = [free_port() for _ in range(engines.count)]
        started = spawn_all([(["tests.fake_engine", *engines.args], port) for port in ports])
        self.procs.update({f"engine{i}": proc for i, proc in enumerate(started)})
        upstreams = [f"http://127.0.0.1:{port}" for port in ports]
        if shared:
            self.procs["redis"] = redis_server(self.redis_port)
        for g in range(n_gateways):
            args = ["fairness.gateway", "--policy", "vtc", "--probe-interval", "0.2"]
            args += ["--limit", str(engines.limit)] if engines.limit else []
            args += [x for e in upstreams for x in ("--upstream", e)]
            if shared:
                store = f"redis://127.0.0.1:{self.redis_port}"
                if proxied:
                    self.proxies.append(ProxyProcess(self.redis_port))
                    store = self.proxies[g].url
                args += ["--state", store, "--gateway-id", f"g{g}"]
            if tenants_file is not None:
                args += ["--tenants", str(tenants_file)]
            self._args.append(args + list(gateway_args))
            self.urls.append(f"http://127.0.0.1:{free_port()}")
        self.start_gateways(range(n_gateways))

    def start_gateways(self, gateways: Iterable[int]) -> None:
        """(Re)start these gateways on their ports, with their ids, side by side."""
        gateways = list(gateways)
        started = spawn_all([(self._args[g], int(self.urls[g].rsplit(":", 1)[1])) for g in gateways])
        self.procs.update({f"gateway{g}": proc for g, proc in zip(gateways, started, strict=True)})

    def kill_gateway(self, g: int) -> None:
        proc = self.procs[f"gateway{g}"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_store(self) -> None:
        self.procs["redis"].send_signal(signal.SIGKILL)
        self.procs["redis"].wait()

    def start_store(self) -> None:
        """A new, empty store on the same port."""
        self.procs["redis"] = redis_server(self.redis_port)

    def store(self):
        import redis

        return redis.Redis(port=self.redis_port)

    def metric(self, g: int, name: str) -> float | None:
        for line in httpx.get(self.urls[g] + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def close(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(10)
        for proxy in self.proxies:
            proxy.close()


@contextlib.contextmanager
def fleet(n_gateways: int, shared: bool, tenants_file: Path | None = None, engines: Engines = Engines(),
          gateway_args: tuple[str, ...] = (), proxied: bool = False) -> Iterator[Fleet]:  # fmt: skip
    f = Fleet(n_gateways, shared, tenants_file, engines, gateway_args, proxied)
    try:
        yield f
    finally:
        f.close()


@contextlib.contextmanager
def tenants_keys(tenants: list[Tenant]) -> Iterator[Path | None]:
    """A tenants file with each tenant's weight (key-<name>) when any weight is not 1, else None."""
    if all(t.weight == 1.0 for t in tenants):
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "tenants.json"
        keys.write_text(json.dumps({f"key-{t.name}": {"name": t.name, "weight": t.weight} for t in tenants}))
        yield keys


def run(
    tenants: list[Tenant],
    n_gateways: int = 2,
    shared: bool = True,
    seconds: float = 8.0,
    warmup_s: float = 2.0,
    measure_from: float | None = None,
    engines: Engines = Engines(),
    events: Callable[[Fleet, Run], list[tuple[float, Callable[[], None]]]] | None = None,
    stop_after_error: set[int] = frozenset(),
    proxied: bool = False,
) -> tuple[Run, dict]:
    """One scenario: `tenants` backlogged through their gateways for `seconds`; service counted from `warmup_s` (or
    `measure_from`) on. events(fleet, run): (time, action) pairs to run during it. Returns the run and, for a shared
    store, what it holds once the gateways have flushed: {"charged": tenant -> service billed, "metrics": per
    gateway, its store error and local admission counts}."""
    with tenants_keys(tenants) as keys, fleet(n_gateways, shared, keys, engines, proxied=proxied) as f:
        out = Run()
        drive(f.urls, tenants, seconds, measure_from if measure_from is not None else warmup_s, out,
              keyed=keys is not None, events=events(f, out) if events else (),
              stop_after_error=stop_after_error)  # fmt: skip
        after = {}
        if shared:
            after["charged"] = settled_charges(f.store())
            after["metrics"] = {
                g: {name: f.metric(g, f"fairness_gateway_{name}")
                    for name in ("store_errors_total", "local_admissions_total", "shared_state_up")}
                for g in range(n_gateways) if f.procs[f"gateway{g}"].poll() is None
            }  # fmt: skip
        return out, after


def charged(store) -> dict[str, float]:
    """What the store has billed each tenant."""
    return {k.decode(): float(v) for k, v in store.hgetall("fairness:charged").items()}


def settled_charges(store, timeout_s: float = 5.0) -> dict[str, float]:
    """The store's bill once the gateways' last charges have reached it: unchanged over 4 ticks (a loaded machine
    delays a gateway's tick), or as it stands after `timeout_s`."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        time.sleep(4 * TICK_S)
        now = charged(store)
        if now == last:
            break
        last = now
    return last


@dataclass(frozen=True)
class Load:
    """What every tenant's clients do: closed loop through their gateways for `seconds` from a start (monotonic s)
    that the driver sets once every client process is up, service counted from `measure_from` on. keyed: tenants
    authenticate as `key-<name>`, else name themselves in `user`; stop_after_error: gateways whose clients stop at
    their first error (after a kill)."""

    urls: list[str]
    seconds: float
    measure_from: float
    keyed: bool
    stop_after_error: frozenset[int]
    model: str
    prompt: str
    max_tokens: int


def clients(tenant: Tenant, streams: list[int], load: Load, go, start, results) -> None:
    """Some of a tenant's streams (the gateway of each), in a process of their own, as clients are in a deployment:
    with every stream a thread of one process, the side with more streams holds the GIL more often on two cores and
    the other's clients stop keeping it backlogged, which is unfairness of the load generator, not of the gateways.
    Puts None when ready, waits for `go` and reads `start` (a shared double), then puts its `Run`."""
    results.put(None)
    go.wait()
    out, lock = Run(start=start.value), threading.Lock()
    window = (out.start + load.measure_from, out.start + load.seconds)

    def stream(g: int) -> None:
        client = openai.OpenAI(base_url=load.urls[g] + "/v1", api_key=f"key-{tenant.name}" if load.keyed else "none",
                               max_retries=0, timeout=60)  # fmt: skip
        while time.monotonic() < out.start + load.seconds:
            t0 = time.monotonic()
            try:
                first, usage = None, None
                for chunk in client.completions.create(
                    model=load.model,
                    prompt=load.prompt,
                    max_tokens=load.max_tokens,
                    stream=True,
                    user=tenant.name,
                    stream_options={"include_usage": True},
                ):
                    first = first or time.monotonic()
                    usage = chunk.usage or usage
            except (openai.APIError, httpx.HTTPError) as e:
                with lock:
                    out.errors[g].append(f"{type(e).__name__}: {e}"[:200])
                if g in load.stop_after_error:  # its gateway is gone: the client stops (or fails over, elsewhere)
                    return
                time.sleep(0.05)
                continue
            end = time.monotonic()
            with lock:
                out.ok[g] += 1
                if usage is not None:
                    service = (usage.prompt_tokens + 2 * usage.completion_tokens) / tenant.weight
                    out.done.append(Done(tenant.name, t0, end, service))
                    if window[0] <= end <= window[1]:
                        out.service[tenant.name] += usage.prompt_tokens + 2 * usage.completion_tokens
                        out.requests += 1
                        if first is not None:
                            out.ttft.append(first - t0)

    threads = [threading.Thread(target=stream, args=(g,), daemon=True) for g in streams]
    for th in threads:
        th.start()
    deadline = out.start + load.seconds + 90
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    out.lost = sum(th.is_alive() for th in threads)
    with lock:
        results.put(out)


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
    """Each tenant's streams (`clients`, STREAMS_PER_PROCESS to a process), closed loop through its gateways
    (`urls`) for `seconds`, counting service from `measure_from`; `events` run at their times. keyed,
    stop_after_error: as `Load`'s."""
    out = out or Run()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.fleet_harness"])  # one import of the client for all runs
    results, go, shared_start = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    load = Load(urls, seconds, measure_from, keyed, frozenset(stop_after_error), model, prompt, max_tokens)
    procs = []
    for t in tenants:
        streams = [g for g in t.gateways for _ in range(t.streams)]
        for i in range(0, len(streams), STREAMS_PER_PROCESS):
            part = streams[i : i + STREAMS_PER_PROCESS]
            procs.append(ctx.Process(target=clients, args=(t, part, load, go, shared_start, results), daemon=True))
    for proc in procs:
        proc.start()
    for _ in procs:
        results.get(timeout=60)  # each process is up, its client imported
    start = out.start = shared_start.value = time.monotonic()
    go.set()
    for at, event in sorted(events, key=lambda e: e[0]):
        time.sleep(max(0.0, start + at - time.monotonic()))
        event()
    for _ in procs:
        part = results.get(timeout=max(1.0, start + seconds + 120 - time.monotonic()))
        for g, n in part.ok.items():
            out.ok[g] += n
        for g, errors in part.errors.items():
            out.errors[g] += errors
        for t, v in part.service.items():
            out.service[t] += v
        out.done += part.done
        out.ttft += part.ttft
        out.requests += part.requests
        out.lost += part.lost
    for proc in procs:
        proc.join(10)
    out.seconds = seconds - measure_from
    return out


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
        "lost": r.lost,
    }


SKEWED = [Tenant("heavy", [0, 1]), Tenant("light", [0])]  # the light tenant reaches gateway A only
DYNAMO = [Tenant("x", [0], weight=4.0), Tenant("y", [1], weight=1.0)]  # DEP #15187: 4:1, one router each

# One tick of streamed tokens across the fleet, in service: every engine slot streams a token each STEP_S, each
# output token counting 2. A gateway's charges reach the store within a tick, so counters trail usage by at most this.
TICK_SERVICE = ENGINES * MAX_RUNNING * (TICK_S / STEP_S) * 2
REQUEST_SERVICE = 1 + 2 * MAX_TOKENS  # one request's service ("x" is one prompt token)


def fault(kind: str, at: float = 3.0, outage_s: float = 5.0, after_s: float = 8.0) -> dict:
    """One of FAULTS on the skewed two-gateway fleet: the fault at `at`, recovery `outage_s` later, the run's end
    `after_s` after that. Returns what the checks read: requests lost, errors per gateway, the shares since the
    warm-up (`shares_since_start`: VTC repays after recovery what an outage's local orders skewed), during the
    outage and after recovery (`shares`), what the store billed (store-restart: and what the old one had billed just
    before the kill) against the usage the responses reported, and what /metrics showed during the outage and 2 s
    after recovery."""
    back = at + outage_s
    seconds = back + after_s
    seen: dict[str, list] = defaultdict(list)
    billed_before: dict[str, float] = {}  # store-restart: the old store's bill just before it was killed

    def events(f: Fleet, out: Run) -> list[tuple[float, Callable[[], None]]]:
        def look(label: str) -> Callable[[], None]:
            return lambda: seen[label].append(
                {g: f.metric(g, "fairness_gateway_shared_state_up") for g in range(2)
                 if f.procs[f"gateway{g}"].poll() is None}
            )  # fmt: skip

        def slow(delay: float) -> Callable[[], None]:
            def act() -> None:
                for p in f.proxies:
                    p.delay(delay)

            return act

        acts = {
            "slow-store": [(at, slow(0.05)), (back, slow(0.0))],
            "partition": [(at, f.proxies[1].cut), (at + 1.5, look("during")), (back, f.proxies[1].heal)],
            "store-restart": [
                (at, lambda: billed_before.update(charged(f.store())) or f.stop_store()),
                (at + 1.5, look("during")),
                (back, f.start_store),
            ],
            "gateway-restart": [(at, lambda: f.kill_gateway(1)), (back, lambda: f.start_gateways([1]))],
        }[kind]
        return acts + [(back + 2.0, look("after"))]

    r, after = run(SKEWED, 2, True, seconds, measure_from=back, events=events, proxied=True)
    usage = r.usage()
    return {
        "fault": kind, "at_s": at, "recovered_at_s": back, "seconds": seconds, "lost": r.lost,
        "errors": {g: len(e) for g, e in r.errors.items()}, "shares": r.shares({"heavy": 1.0, "light": 1.0}),
        "shares_since_start": r.shares_between(2.0, seconds), "shares_during": r.shares_between(at, back),
        "charged": after["charged"], "usage": dict(usage),
        "billed_before_restart": billed_before or None,
        "usage_sent_after_restart": dict(r.usage(sent_after=back)) if kind == "store-restart" else None,
        "state_up_seen": dict(seen), "metrics": after["metrics"], "tick_service": TICK_SERVICE,
    }  # fmt: skip


FAULTS = ("slow-store", "partition", "store-restart", "gateway-restart")
