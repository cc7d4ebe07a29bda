"""Discrete-event simulation of a continuous-batching LLM engine driven by a scheduling policy.

Each step: running decodes go first (one token each, never stalled by prefill), then unfinished prefills continue in
chunks, then the policy admits waiting requests while the per-step token budget, the KV pool and the batch size
allow (stall-free, chunked prefill in the Sarathi-Serve sense). KV grows by one token per generated token; when it
runs out, the policy picks a running request to preempt (its KV dropped); it goes back to the policy, which decides
when it resumes, and is then recomputed (as vLLM does).

Optional policy hooks: `configure(engine, telemetry)` once before the run (the telemetry serves the simulator's own
per-step estimate: NVML is never read in a simulation), and `batch_limits(now) -> (step tokens, running requests)`
each step for adaptive batching (clipped to the engine's maxima).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .engine import EngineModel
from .metrics import FairnessTracker, percentile
from .policy import SchedulingPolicy, make_policy
from .request import Request, RequestInfo
from .telemetry import Telemetry

W_P, W_Q = 1.0, 2.0  # VTC's service weights of an input and an output token, used to measure service


@dataclass
class _Seq:
    info: RequestInfo
    output_tokens: int  # true length (capped by max_output_tokens): the simulator's secret
    prompt: int  # tokens to prefill: input, plus generated ones after a preemption
    prefilled: int = 0
    generated: int = 0
    kv: int = 0
    admitted_s: float | None = None
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


def simulate(
    requests: list[Request],
    policy: str | SchedulingPolicy,
    engine: EngineModel | None = None,
    until_s: float | None = None,
    sample_every_s: float = 1.0,
    window_s: float = 60.0,
) -> SimResult:
    """Run `requests` through `engine` scheduled by `policy` (a name or an instance).

    until_s: stop at this time (default: when every request has finished). Service is VTC's measure,
    (1 x input tokens + 2 x output tokens) / client weight.
    """
    engine = engine or EngineModel()
    policy = make_policy(policy)
    if not requests:
        raise ValueError("simulate needs at least one request")
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    for r in reqs:
        if r.input_tokens + min(r.output_tokens, r.max_output_tokens or r.output_tokens) > engine.kv_tokens:
            raise ValueError(
                f"a request of {r.client!r} needs {r.input_tokens} + {r.output_tokens} KV tokens but the engine has "
                f"{engine.kv_tokens}; use a larger kv_tokens or drop such requests"
            )
    seqs = [
        _Seq(RequestInfo(i, r.client, r.arrival_s, r.input_tokens, r.max_output_tokens, r.weight),
             min(r.output_tokens, r.max_output_tokens or r.output_tokens), r.input_tokens)
        for i, r in enumerate(reqs)
    ]  # fmt: skip
    if getattr(policy, "needs_oracle", False):
        policy.set_oracle({s.info.id: s.output_tokens for s in seqs})
    telemetry = Telemetry(nvml=False)
    if hasattr(policy, "configure"):
        policy.configure(engine, telemetry)
    clients = sorted({r.client for r in reqs})
    tracker = FairnessTracker(clients, sample_every_s, window_s)
    waiting = dict.fromkeys(clients, 0)  # arrived, not running (queued at the policy or preempted)
    running: list[_Seq] = []
    kv_used, t, nxt, busy_s, budget_used, compute_s = 0, reqs[0].arrival_s, 0, 0.0, 0.0, 0.0
    start = t
    n_done = preemptions = recomputed = prefilled_total = 0
    while n_done < len(seqs) and (until_s is None or t < until_s):
        while nxt < len(seqs) and seqs[nxt].info.arrival_s <= t:
            s = seqs[nxt]
            policy.add_request(s.info, t)
            waiting[s.info.client] += 1
            nxt += 1
        decode = [s for s in running if s.prefilled >= s.prompt]
        while kv_used + len(decode) > engine.kv_tokens:  # out of KV: the policy picks whom to preempt
            victim = seqs[policy.preemption_victim([r.info for r in running]).id]
            running.remove(victim)
            kv_used -= victim.kv
            victim.computed = max(victim.computed, victim.prefilled + max(0, victim.kv - victim.prompt))
            victim.kv, victim.prefilled, victim.prompt = 0, 0, victim.info.input_tokens + victim.generated
            preemptions += 1
            policy.on_preempt(victim.info, t)
            waiting[victim.info.client] += 1
            decode = [s for s in running if s.prefilled >= s.prompt]
        max_step_tokens, max_running = engine.max_step_tokens, engine.max_running
        if hasattr(policy, "batch_limits"):
            want_tokens, want_running = policy.batch_limits(t)
            max_step_tokens = max(1, min(max_step_tokens, int(want_tokens)))
            max_running = max(1, min(max_running, int(want_running)))
        budget = max_step_tokens - len(decode)
        chunks: list[tuple[_Seq, int]] = []
        for s in running:
            if s.prefilled < s.prompt and budget > 0:
                n = min(s.prompt - s.prefilled, budget)
                chunks.append((s, n))
                budget -= n
        while budget > 0 and len(running) < max_running:
            cand = policy.next_request(t)
            if cand is None:
                break
            s = seqs[cand.id]
            if kv_used + s.prompt + 1 > engine.kv_tokens:
                break
            policy.on_admit(s.info, t)
            if s.admitted_s is None:
                s.admitted_s = t
            waiting[s.info.client] -= 1
            running.append(s)
            s.kv = s.prompt
            kv_used += s.prompt
            n = min(s.prompt, budget)
            chunks.append((s, n))
            budget -= n
        if not decode and not chunks:  # idle: jump to the next arrival (or let a rate limit expire)
            if nxt < len(seqs):
                t = max(t, seqs[nxt].info.arrival_s) if not any(waiting.values()) else t + 0.05
            elif any(waiting.values()):
                t += 0.05
            else:
                break
            tracker.observe(t, waiting)
            continue

        prefill_tokens = sum(n for _, n in chunks)
        prefilled_total += prefill_tokens
        step_s = engine.step_seconds(prefill_tokens, len(decode), sum(s.kv for s in decode))
        t += step_s
        busy_s += step_s
        budget_used += step_s * (prefill_tokens + len(decode)) / engine.max_step_tokens
        # modelled compute utilisation: the share of the step a compute-bound engine would need for its tokens
        step_compute = min(step_s, engine.prefill_s_per_token * (prefill_tokens + len(decode)))
        compute_s += step_compute
        telemetry.report_estimate(t, step_compute / step_s)
        generated: dict[int, int] = {}
        for s in decode:
            generated[s.info.id] = 1
        for s, n in chunks:
            recomputed += max(0, min(s.prefilled + n, s.computed) - s.prefilled)  # KV it had before a preemption
            s.prefilled += n
            newly = min(s.prefilled, s.info.input_tokens) - s.input_served
            if newly > 0:
                s.input_served += newly
                tracker.serve(s.info.client, W_P * newly / s.info.weight)
            if s.prefilled >= s.prompt:
                generated[s.info.id] = 1  # the step that finishes a prefill samples the next token
                if s.first_token_s is None:
                    s.first_token_s = t
        done = []
        for rid, n in generated.items():
            s = seqs[rid]
            s.generated += n
            s.kv += n
            kv_used += n
            tracker.serve(s.info.client, W_Q * n / s.info.weight)
            if s.generated >= s.output_tokens:
                done.append(s)
        policy.on_step(generated, step_s, t)
        for s in done:
            s.finish_s = t
            running.remove(s)
            kv_used -= s.kv
            s.kv = 0
            n_done += 1
            policy.on_finish(s.info, s.generated, t)
        tracker.observe(t, waiting)

    makespan = max(t - start, 1e-9)
    counts = {"preemptions": preemptions, "recomputed_tokens": recomputed, "compute_s": compute_s,
              "prefilled_tokens": prefilled_total,
              "recompute_s": recomputed * engine.prefill_s_per_token}  # fmt: skip
    return _result(policy, seqs, clients, tracker, makespan, busy_s, budget_used, counts)


def _result(policy, seqs, clients, tracker, makespan, busy_s, budget_used, counts) -> SimResult:
    ttft = {c: [] for c in clients}
    e2e = {c: [] for c in clients}
    out_tokens = in_tokens = 0
    for s in seqs:
        out_tokens += s.generated
        in_tokens += s.input_served
        if s.first_token_s is not None:
            ttft[s.info.client].append(s.first_token_s - s.info.arrival_s)
        if s.finish_s is not None:
            e2e[s.info.client].append(s.finish_s - s.info.arrival_s)
    all_ttft = [x for v in ttft.values() for x in v]
    all_e2e = [x for v in e2e.values() for x in v]
    metrics = {
        "max_service_diff": tracker.max_diff,
        "jain": tracker.jain(),
        "throughput_tok_s": out_tokens / makespan,
        "input_tok_s": in_tokens / makespan,
        "ttft_p50_s": percentile(all_ttft, 50),
        "ttft_p99_s": percentile(all_ttft, 99),
        "e2e_p50_s": percentile(all_e2e, 50),
        "e2e_p99_s": percentile(all_e2e, 99),
        "utilization": busy_s / makespan,
        "token_budget_use": budget_used / max(busy_s, 1e-9),
        "compute_utilization": counts["compute_s"] / makespan,  # modelled (see simulate), not NVML's busy flag
        "preemptions": float(counts["preemptions"]),
        "useful_compute_utilization": (counts["compute_s"] - counts["recompute_s"]) / makespan,  # minus recompute
        "prefilled_tokens": float(counts["prefilled_tokens"]),
        "recomputed_tokens": float(counts["recomputed_tokens"]),  # KV prefilled again after preemptions
        "finished": float(sum(s.finish_s is not None for s in seqs)),
        "requests": float(len(seqs)),
        "makespan_s": makespan,
    }
    per_client = {
        c: {
            "service": tracker.total(c),
            "requests": float(sum(s.info.client == c for s in seqs)),
            "ttft_p50_s": percentile(ttft[c], 50),
            "ttft_p99_s": percentile(ttft[c], 99),
            "e2e_p50_s": percentile(e2e[c], 50),
            "e2e_p99_s": percentile(e2e[c], 99),
        }
        for c in clients
    }
    times, service = tracker.series()
    return SimResult(getattr(policy, "name", type(policy).__name__), metrics, per_client, times, service, ttft)
