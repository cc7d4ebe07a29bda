"""Discrete-event simulation of a continuous-batching LLM engine driven by a scheduling policy.

Each step: running decodes go first (one token each, never stalled by prefill), then unfinished prefills continue in
chunks, then the policy admits waiting requests while the per-step token budget, the KV pool and the batch size
allow (stall-free, chunked prefill in the Sarathi-Serve sense). KV grows by one token per generated token; when it
runs out, the policy picks a running request to preempt (its KV dropped); it goes back to the policy, which decides
when it resumes, and is then recomputed (as vLLM does). The telemetry the policy sees serves the simulator's own
per-step estimate: NVML is never read in a simulation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fairness.core.driver import EngineObserver, PolicyDriver
from fairness.core.engine_model import EngineModel
from fairness.core.policy import SchedulingPolicy, make_policy
from fairness.core.request import Request, RequestInfo
from fairness.core.service import service
from fairness.core.telemetry import Telemetry
from fairness.measure.metrics import FairnessTracker, percentile
from fairness.measure.records import RequestRecord, latencies, latency_metrics, paper_metrics


@dataclass
class _Seq:
    info: RequestInfo
    output_tokens: int  # true length (capped by max_output_tokens): the simulator's secret
    prompt: int  # tokens to prefill: input, plus generated ones after a preemption
    prefilled: int = 0
    generated: int = 0
    kv: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    input_served: int = 0  # input tokens counted as service (recomputation after preemption is not service)
    computed: int = 0  # KV tokens it had computed before a preemption: prefilling them again is recomputation


@dataclass
class SimResult:
    """Outcome of `simulate`: `metrics` (a flat dict), per-client numbers, and each client's service over time."""

    policy: str
    metrics: dict[str, float]
    per_client: dict[str, dict[str, float]]
    times: np.ndarray  # [K] sample times (s)
    service: dict[str, np.ndarray] = field(default_factory=dict)  # client -> [K] cumulative weighted service
    ttft: dict[str, list[float]] = field(default_factory=dict)  # client -> TTFT of each request (s)
    records: list[RequestRecord] = field(default_factory=list)  # every request, as it was served


class Simulator:
    """One run of `requests` through `engine` under `policy`: arrive, preempt, schedule, step, finish, repeat."""

    def __init__(
        self,
        requests: Sequence[Request],
        policy: str | SchedulingPolicy,
        engine: EngineModel | None = None,
        sample_every_s: float = 1.0,
        window_s: float = 60.0,
        observers: Sequence[EngineObserver] = (),
    ):
        if not requests:
            raise ValueError("simulate needs at least one request")
        self.engine = engine or EngineModel()
        self.policy = make_policy(policy)
        self.driver = PolicyDriver(self.policy, observers)
        reqs = sorted(requests, key=lambda r: r.arrival_s)
        for r in reqs:
            if r.input_tokens + min(r.output_tokens, r.max_output_tokens or r.output_tokens) > self.engine.kv_tokens:
                raise ValueError(
                    f"a request of {r.client!r} needs {r.input_tokens} + {r.output_tokens} KV tokens but the engine "
                    f"has {self.engine.kv_tokens}; use a larger kv_tokens or drop such requests"
                )
        self.seqs = [
            _Seq(
                RequestInfo(i, r.client, r.arrival_s, r.input_tokens, r.max_output_tokens, r.weight),
                min(r.output_tokens, r.max_output_tokens or r.output_tokens),
                r.input_tokens,
            )
            for i, r in enumerate(reqs)
        ]
        self.clients = sorted({r.client for r in reqs})
        self.tracker = FairnessTracker(self.clients, sample_every_s, window_s)
        self.telemetry = Telemetry(nvml=False)
        self.waiting = dict.fromkeys(self.clients, 0)  # arrived, not running (queued at the policy or preempted)
        self.running: list[_Seq] = []
        self.t = self.start = reqs[0].arrival_s
        self.kv_used = self.next_arrival = self.done = 0
        self.counts: dict[str, float] = defaultdict(float)  # busy_s, budget_used, compute_s, preemptions, ...

    def run(self, until_s: float | None = None) -> SimResult:
        self.driver.start(self.engine, self.telemetry, {s.info.id: s.output_tokens for s in self.seqs})
        while self.done < len(self.seqs) and (until_s is None or self.t < until_s):
            self.arrive()
            decode, chunks = self.next_batch()
            if not decode and not chunks:
                if not self.idle():
                    break
                continue
            self.finish(self.step(decode, chunks))
            self.tracker.observe(self.t, self.waiting)
        return self._result()

    def next_batch(self) -> tuple[list[_Seq], list[tuple[_Seq, int]]]:
        """What the next step runs: decoding requests and prefill chunks (continuous batching, chunked prefill)."""
        decode = self.preempt()
        return decode, self.schedule(decode)

    # --- phases ---------------------------------------------------------------------------------------------------

    def arrive(self) -> None:
        """Hand every request that has arrived by now to the policy."""
        while self.next_arrival < len(self.seqs) and self.seqs[self.next_arrival].info.arrival_s <= self.t:
            s = self.seqs[self.next_arrival]
            self.driver.arrive(s.info, self.t)
            self.waiting[s.info.client] += 1
            self.next_arrival += 1

    def preempt(self) -> list[_Seq]:
        """Out of KV for this step's decodes: the policy picks whom to preempt. Returns the decoding requests."""
        decode = [s for s in self.running if s.prefilled >= s.prompt]
        while self.kv_used + len(decode) > self.engine.kv_tokens:
            victim = self.seqs[self.driver.victim([r.info for r in self.running]).id]
            self.running.remove(victim)
            self.kv_used -= victim.kv
            victim.computed = max(victim.computed, victim.prefilled + max(0, victim.kv - victim.prompt))
            victim.kv, victim.prefilled, victim.prompt = 0, 0, victim.info.input_tokens + victim.generated
            self.counts["preemptions"] += 1
            self.driver.preempt(victim.info, self.t)
            self.waiting[victim.info.client] += 1
            decode = [s for s in self.running if s.prefilled >= s.prompt]
        return decode

    def schedule(self, decode: list[_Seq]) -> list[tuple[_Seq, int]]:
        """Prefill chunks for this step: unfinished prefills first, then requests the policy admits."""
        max_step_tokens, max_running = self.driver.limits(self.t, self.engine.max_step_tokens, self.engine.max_running)
        budget = max_step_tokens - len(decode)
        chunks: list[tuple[_Seq, int]] = []
        for s in self.running:
            if s.prefilled < s.prompt and budget > 0:
                n = min(s.prompt - s.prefilled, budget)
                chunks.append((s, n))
                budget -= n

        def room() -> bool:  # reads the budget as admissions shrink it
            return budget > 0 and len(self.running) < max_running

        for cand in self.driver.candidates(self.t, room):
            s = self.seqs[cand.id]
            if self.kv_used + s.prompt + 1 > self.engine.kv_tokens:
                break
            self.admit(s)
            n = min(s.prompt, budget)
            chunks.append((s, n))
            budget -= n
        return chunks

    def admit(self, s: _Seq) -> None:
        """The policy admits `s`: it joins the running batch with the KV of its prompt (to prefill)."""
        self.driver.admit(s.info, self.t)
        self.waiting[s.info.client] -= 1
        self.running.append(s)
        s.kv = s.prompt
        self.kv_used += s.prompt

    def idle(self) -> bool:
        """Nothing to run: jump to the next arrival (or let a rate limit expire). False when all is done."""
        if self.next_arrival < len(self.seqs):
            nxt = self.seqs[self.next_arrival].info.arrival_s
            self.t = max(self.t, nxt) if not any(self.waiting.values()) else self.t + 0.05
        elif any(self.waiting.values()):
            self.t += 0.05
        else:
            return False
        self.tracker.observe(self.t, self.waiting)
        return True

    def step(self, decode: list[_Seq], chunks: list[tuple[_Seq, int]]) -> list[_Seq]:
        """Run one engine step: time passes, prompts are prefilled, tokens generated. Returns finished requests."""
        e, c = self.engine, self.counts
        prefill_tokens = sum(n for _, n in chunks)
        c["prefilled_tokens"] += prefill_tokens
        step_s = e.step_seconds(prefill_tokens, len(decode), sum(s.kv for s in decode))
        self.t += step_s
        c["busy_s"] += step_s
        c["budget_used"] += step_s * (prefill_tokens + len(decode)) / e.max_step_tokens
        # modelled compute utilisation: the share of the step a compute-bound engine would need for its tokens
        step_compute = min(step_s, e.prefill_s_per_token * (prefill_tokens + len(decode)))
        c["compute_s"] += step_compute
        self.telemetry.report_estimate(self.t, step_compute / step_s)
        generated: dict[int, int] = {s.info.id: 1 for s in decode}
        for s, n in chunks:
            c["recomputed_tokens"] += max(0, min(s.prefilled + n, s.computed) - s.prefilled)  # KV it had before
            s.prefilled += n
            newly = min(s.prefilled, s.info.input_tokens) - s.input_served
            if newly > 0:
                s.input_served += newly
                self.tracker.serve(s.info.client, service(newly, 0, s.info.weight))
            if s.prefilled >= s.prompt:
                generated[s.info.id] = 1  # the step that finishes a prefill samples the next token
                if s.first_token_s is None:
                    s.first_token_s = self.t
        done = []
        for rid, n in generated.items():
            s = self.seqs[rid]
            s.generated += n
            s.kv += n
            self.kv_used += n
            self.tracker.serve(s.info.client, service(0, n, s.info.weight))
            if s.generated >= s.output_tokens:
                done.append(s)
        self.driver.step(generated, step_s, self.t)
        return done

    def finish(self, done: list[_Seq]) -> None:
        for s in done:
            s.finish_s = self.t
            self.running.remove(s)
            self.kv_used -= s.kv
            s.kv = 0
            self.done += 1
            self.driver.finish(s.info, s.generated, self.t)

    # --- results --------------------------------------------------------------------------------------------------

    def _result(self) -> SimResult:
        seqs, clients, c = self.seqs, self.clients, self.counts
        makespan = max(self.t - self.start, 1e-9)
        recompute_s = c["recomputed_tokens"] * self.engine.prefill_s_per_token
        records = [
            RequestRecord(
                s.info.client,
                s.info.arrival_s,
                s.info.input_tokens,
                s.generated,
                s.first_token_s,
                s.finish_s,
                s.info.weight,
            )
            for s in seqs
        ]
        ttft, e2e = latencies(records)
        metrics = {
            "max_service_diff": self.tracker.max_diff,
            "worst_interval_service_diff": self.tracker.worst_interval_diff,
            **paper_metrics(records, resolution_s=0.5),  # the VTC paper's measures, as its artifact takes them
            "jain": self.tracker.jain(),
            "throughput_tok_s": sum(s.generated for s in seqs) / makespan,
            "input_tok_s": sum(s.input_served for s in seqs) / makespan,
            **latency_metrics(ttft, e2e),
            "utilization": c["busy_s"] / makespan,
            "token_budget_use": c["budget_used"] / max(c["busy_s"], 1e-9),
            "compute_utilization": c["compute_s"] / makespan,  # modelled (see step), not NVML's busy flag
            "useful_compute_utilization": (c["compute_s"] - recompute_s) / makespan,  # minus recomputation
            "preemptions": float(c["preemptions"]),
            "prefilled_tokens": float(c["prefilled_tokens"]),
            "recomputed_tokens": float(c["recomputed_tokens"]),  # KV prefilled again after preemptions
            "finished": float(self.done),
            "requests": float(len(seqs)),
            "makespan_s": makespan,
            **self.driver.overhead_us(),
        }
        per_client = {
            cl: {
                "service": self.tracker.total(cl),
                "requests": float(sum(s.info.client == cl for s in seqs)),
                "ttft_p50_s": percentile(ttft[cl], 50),
                "ttft_p99_s": percentile(ttft[cl], 99),
                "e2e_p50_s": percentile(e2e[cl], 50),
                "e2e_p99_s": percentile(e2e[cl], 99),
            }
            for cl in clients
        }
        times, served = self.tracker.series()
        return SimResult(self.policy.name, metrics, per_client, times, served, ttft, records)


def simulate(
    requests: Sequence[Request],
    policy: str | SchedulingPolicy,
    engine: EngineModel | None = None,
    until_s: float | None = None,
    sample_every_s: float = 1.0,
    window_s: float = 60.0,
    observers: Sequence[EngineObserver] = (),
) -> SimResult:
    """Run `requests` through `engine` scheduled by `policy` (a name or an instance).

    until_s: stop at this time (default: when every request has finished). Service is VTC's measure,
    (1 x input tokens + 2 x output tokens) / client weight. observers: `EngineObserver`s that see every event.
    """
    from fairness.sim.slora import SloraSimulator  # a subclass: imported here to keep one direction of imports

    engine = engine or EngineModel()
    cls = SloraSimulator if engine.mode == "slora" else Simulator
    return cls(requests, policy, engine, sample_every_s, window_s, observers).run(until_s)
