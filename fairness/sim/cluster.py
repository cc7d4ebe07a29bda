"""Many engines at once: N replicas behind one policy (a fair gateway's global queue), or each replica behind its own
policy with a load balancer in front (round-robin or least-loaded), at scale (tens of replicas, thousands of tenants).

Each replica is a continuous-batching engine with `EngineModel`'s step time: every step its running requests decode
one token each, and the requests it admits while the step's token budget lasts are prefilled whole in that step (KV
is assumed to fit: the one-engine `Simulator` models KV, chunked prefill and preemption, this one models scale).
Admission goes through `PolicyDriver.candidates`, the one admission loop of every engine in this package.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fairness.core.driver import PolicyDriver
from fairness.core.engine_model import EngineModel
from fairness.core.policy import make_policy
from fairness.core.request import Request, RequestInfo
from fairness.core.service import service
from fairness.core.telemetry import Telemetry
from fairness.measure.metrics import jain_index
from fairness.sim.workloads import bundled_trace, load_azure_csv

MODES = ("global", "round-robin", "least-loaded")  # one policy for all; per-replica policies behind a balancer


def cluster_workload(
    tenants: int = 10_000, rate_per_s: float = 1000.0, duration_s: float = 30.0, seed: int = 0, zipf_s: float = 1.0
) -> list[Request]:
    """Zipf(zipf_s) tenants with bursty arrivals: the Azure 2023 conversation trace's inter-arrival gaps and token
    counts, cycled and rescaled to `rate_per_s` on average."""
    trace = sorted(load_azure_csv(bundled_trace("azure-llm-2023-conv.csv"), clients=1), key=lambda r: r.arrival_s)
    gaps = np.diff([r.arrival_s for r in trace])
    gaps *= (1.0 / rate_per_s) / gaps.mean()
    n = int(duration_s * rate_per_s)
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, tenants + 1) ** zipf_s
    who = rng.choice(tenants, size=n, p=p / p.sum())  # [n]
    arrivals = np.concatenate([[0.0], np.cumsum(np.resize(gaps, n - 1))])  # [n]
    return [
        Request(
            f"tenant-{who[i]}",
            float(arrivals[i]),
            trace[i % len(trace)].input_tokens,
            trace[i % len(trace)].output_tokens,
        )
        for i in range(n)
    ]


@dataclass
class _Replica:
    driver: PolicyDriver
    running: list[list]  # [request id, tokens left, context]
    t: float = 0.0
    outstanding: int = 0  # routed to it, not finished (per-replica modes)


class ClusterSimulator:
    """`replicas` engines serving `requests` under `policy`, in one of MODES."""

    def __init__(
        self,
        requests: Sequence[Request],
        policy: str,
        replicas: int = 64,
        engine: EngineModel | None = None,
        mode: str = "global",
        window_s: float = 10.0,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown cluster mode {mode!r}; choose one of {MODES}")
        if replicas < 1 or not requests:
            raise ValueError("a cluster needs at least one replica and one request")
        self.engine, self.mode, self.window_s = engine or EngineModel.preset("a100-llama2-7b"), mode, window_s
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        names = sorted({r.client for r in self.requests})
        self.tenant = {c: i for i, c in enumerate(names)}
        self.infos = [
            RequestInfo(i, r.client, r.arrival_s, r.input_tokens, r.max_output_tokens, r.weight)
            for i, r in enumerate(self.requests)
        ]
        self.drivers = [PolicyDriver(make_policy(policy)) for _ in range(1 if mode == "global" else replicas)]
        self.replicas = [_Replica(self.drivers[k % len(self.drivers)], []) for k in range(replicas)]
        for d in self.drivers:
            d.start(self.engine, Telemetry(nvml=False), oracle=None)
        self.service = np.zeros(len(names))  # [C] weighted tokens served
        self.waiting = np.zeros(len(names), dtype=np.int64)  # [C] arrived, not admitted
        self.backlogged_since = np.full(len(names), np.inf)  # [C] when its queue last became non-empty
        self.windows: list[dict[str, float]] = []
        self.finished = 0
        self.tokens = 0

    def run(self, until_s: float) -> dict[str, float]:
        """Simulate until `until_s`; fairness per window of the tenants backlogged throughout it, throughput, and the
        policy's decision cost per request."""
        wall = time.perf_counter()
        heap: list[tuple[float, int]] = []  # (time of its next step, replica) of the replicas with work
        idle = set(range(len(self.replicas)))
        nxt, rr = 0, 0
        window_start, window_service = 0.0, self.service.copy()
        while True:
            t_step = heap[0][0] if heap else np.inf
            t_arr = self.requests[nxt].arrival_s if nxt < len(self.requests) else np.inf
            t = min(t_step, t_arr)
            while t >= window_start + self.window_s and window_start + self.window_s <= until_s:
                self._close_window(window_start, window_service)
                window_start += self.window_s
                window_service = self.service.copy()
            if t >= until_s:
                break
            if t_arr <= t_step:  # an arrival: to the global queue or a replica's, waking one idle replica
                info = self.infos[nxt]
                nxt += 1
                c = self.tenant[info.client]
                if self.waiting[c] == 0:
                    self.backlogged_since[c] = info.arrival_s
                self.waiting[c] += 1
                if self.mode == "global":
                    self.drivers[0].arrive(info, t_arr)
                    k = min(idle) if idle else None
                else:
                    k = self._route(rr)
                    rr += 1
                    self.replicas[k].driver.arrive(info, t_arr)
                if k in idle:
                    idle.discard(k)
                    self.replicas[k].t = t_arr
                    heapq.heappush(heap, (t_arr, k))
                continue
            _, k = heapq.heappop(heap)
            if self._step(self.replicas[k]):
                heapq.heappush(heap, (self.replicas[k].t, k))
            else:
                idle.add(k)
        decisions = sum(d.calls["next_request"] for d in self.drivers)
        policy_s = sum(sum(d.seconds.values()) for d in self.drivers)
        w = self.windows  # fairness measures: NaN when no window had two tenants backlogged throughout

        def col(k: str) -> np.ndarray:
            return np.array([x[k] for x in w]) if w else np.array([np.nan])

        return {
            "replicas": float(len(self.replicas)),
            "tenants": float(len(self.tenant)),
            "requests": float(nxt),
            "finished": float(self.finished),
            "until_s": until_s,
            "throughput_tok_s": self.tokens / until_s,
            "within_10pct": float(col("within_10pct").mean()),
            "spread": float(col("spread").max()),
            "jain": float(col("jain").mean()),
            "backlogged": float(col("backlogged").mean()),
            "decision_us": 1e6 * sum(d.seconds["next_request"] for d in self.drivers) / max(decisions, 1),
            "policy_us_per_request": 1e6 * policy_s / max(nxt, 1),
            "wall_s": time.perf_counter() - wall,
        }

    # --- internals --------------------------------------------------------------------------------------------------

    def _route(self, rr: int) -> int:
        """Per-replica modes: the load balancer's replica for the next request."""
        if self.mode == "least-loaded":
            k = min(range(len(self.replicas)), key=lambda j: self.replicas[j].outstanding)
        else:
            k = rr % len(self.replicas)
        self.replicas[k].outstanding += 1
        return k

    def _step(self, r: _Replica) -> bool:
        """One engine step of `r` from r.t: admit, prefill, decode, finish. False when it has nothing to run."""
        e, now = self.engine, r.t
        prefill, budget = 0, e.max_step_tokens - len(r.running)  # a step's tokens: decodes, then whole prompts

        def room() -> bool:  # reads prefill as admissions grow it
            return len(r.running) < e.max_running and prefill < budget

        for info in r.driver.candidates(now, room):
            r.driver.admit(info, now)
            c = self.tenant[info.client]
            self.waiting[c] -= 1
            if self.waiting[c] == 0:
                self.backlogged_since[c] = np.inf
            self.service[c] += service(info.input_tokens, 0, info.weight)
            prefill += info.input_tokens
            r.running.append([info.id, self.requests[info.id].output_tokens, info.input_tokens])
        if not r.running:
            return False
        step_s = e.step_seconds(prefill, len(r.running), sum(s[2] for s in r.running))
        r.t = now + step_s
        generated, done = {}, []
        for s in r.running:
            generated[s[0]] = 1
            s[1] -= 1
            s[2] += 1
            info = self.infos[s[0]]
            self.service[self.tenant[info.client]] += service(0, 1, info.weight)
            if s[1] == 0:
                done.append(s)
        self.tokens += len(generated)
        r.driver.step(generated, step_s, r.t)
        for s in done:
            r.running.remove(s)
            if self.mode != "global":
                r.outstanding -= 1  # the balancer's count of what it routed there
            self.finished += 1
            r.driver.finish(self.infos[s[0]], self.requests[s[0]].output_tokens, r.t)
        return True

    def _close_window(self, start: float, service_at_start: np.ndarray) -> None:
        """Tenants backlogged through [start, start + window): how evenly they were served (fair share: the same)."""
        mask = self.backlogged_since <= start
        got = (self.service - service_at_start)[mask]
        if len(got) < 2 or got.mean() <= 0:
            return
        mean = got.mean()
        self.windows.append(
            {
                "within_10pct": float(np.mean(np.abs(got - mean) <= 0.1 * mean)),
                "spread": float((got.max() - got.min()) / mean),
                "jain": jain_index(got),
                "backlogged": float(len(got)),
            }
        )


def simulate_cluster(
    requests: Sequence[Request],
    policy: str = "vtc",
    replicas: int = 64,
    mode: str = "global",
    until_s: float | None = None,
    engine: EngineModel | None = None,
    window_s: float = 10.0,
) -> dict[str, float]:
    """Run `requests` on `replicas` engines in `mode` (see MODES) until `until_s` (default: the last arrival)."""
    until = until_s if until_s is not None else max(r.arrival_s for r in requests)
    return ClusterSimulator(requests, policy, replicas, engine, mode, window_s).run(until)
