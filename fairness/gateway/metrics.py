"""The gateway's Prometheus metrics: per-tenant tokens, queues and outcomes (it watches the policy driver's events),
time to first token, and each upstream's health, load and limit."""

from __future__ import annotations

import contextlib

from fairness.core.driver import EngineObserver
from fairness.core.request import RequestInfo
from fairness.extras import missing

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.registry import Collector
except ImportError as e:
    raise missing("gateway", e) from e

from fairness.gateway.upstreams import UpstreamPool

TOKEN_KINDS = (("prompt",), ("completion",))
OUTCOMES = (("ok",), ("cancelled",), ("no_upstream",), ("upstream_error",))  # of fairness_gateway_requests
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _FleetCounts(Collector):
    """A fleet admission's own counts as Prometheus counters (their one owner is the admission)."""

    def __init__(self, admission) -> None:
        self.admission = admission

    def collect(self):
        errors = CounterMetricFamily(
            "fairness_gateway_store_errors", "store calls that failed (timed out, refused or broke off)"
        )
        errors.add_metric([], self.admission.store_errors)
        local = CounterMetricFamily(
            "fairness_gateway_local_admissions", "admissions made in the local order while the store was away"
        )
        local.add_metric([], self.admission.local_admissions)
        return [errors, local]


class GatewayMetrics(EngineObserver):
    """One registry per gateway. Tenant labels are the tenants' names: bounded by the tenants file when one is set,
    else by the gateway's cap on tenants, and an idle tenant's series leave (`on_forget`)."""

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self._fleet = None  # a fleet gateway's admission (`watch_state`)
        self._streamed: dict[int, tuple[str, int]] = {}  # running request id -> (tenant, completion tokens counted)
        self.registry = r = CollectorRegistry()
        self.tokens = Counter(
            "fairness_gateway_tokens",
            "tokens served, by tenant and kind (prompt: settled from the upstream's usage; completion: as they stream)",
            ["tenant", "kind"],
            registry=r,
        )
        self.requests = Counter(
            "fairness_gateway_requests", "requests ended, by tenant and outcome", ["tenant", "outcome"], registry=r
        )
        self.waiting = Gauge("fairness_gateway_waiting", "requests queued at the gateway", ["tenant"], registry=r)
        self.running = Gauge("fairness_gateway_running", "requests in flight upstream", ["tenant"], registry=r)
        self.ttft = Histogram(
            "fairness_gateway_ttft_seconds",
            "arrival at the gateway to the first token sent",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.healthy = Gauge(
            "fairness_gateway_upstream_healthy", "1 when the upstream passes its probes", ["upstream"], registry=r
        )
        self.in_flight = Gauge("fairness_gateway_upstream_in_flight", "requests in flight", ["upstream"], registry=r)
        self.limit = Gauge(
            "fairness_gateway_upstream_limit", "requests it may have in flight", ["upstream"], registry=r
        )
        self.failures = Counter(
            "fairness_gateway_upstream_failures", "requests it refused or broke off", ["upstream"], registry=r
        )

    def watch_state(self, admission) -> None:
        """A fleet's gateway: export whether its shared state answers, its failed store calls and the admissions it
        made while the store was away (`FleetAdmission`'s counts, read at scrape time)."""
        self._fleet = admission
        self.state_up = Gauge(
            "fairness_gateway_shared_state_up",
            "1 while the fleet's shared store answers; 0: admitting on this gateway's local counters",
            registry=self.registry,
        )
        self.registry.register(_FleetCounts(admission))

    def refresh(self) -> None:
        """Upstream gauges, read at scrape time."""
        if self._fleet is not None:
            self.state_up.set(float(self._fleet.connected))
        for u in self.pool.upstreams:
            self.healthy.labels(u.url).set(float(u.healthy))
            self.in_flight.labels(u.url).set(u.in_flight)
            self.limit.labels(u.url).set(u.limit.value)

    # --- the driver's events ----------------------------------------------------------------------------------------

    def on_arrival(self, req: RequestInfo, now: float) -> None:
        self.waiting.labels(req.client).inc()

    def on_admit(self, req: RequestInfo, now: float) -> None:
        self.waiting.labels(req.client).dec()
        self.running.labels(req.client).inc()
        self._streamed.setdefault(req.id, (req.client, 0))

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        self.running.labels(req.client).dec()
        self.waiting.labels(req.client).inc()

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        for rid, n in generated.items():
            tenant, counted = self._streamed[rid]
            self._streamed[rid] = (tenant, counted + n)
            self.tokens.labels(tenant, "completion").inc(n)

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:
        self.running.labels(req.client).dec()
        _, counted = self._streamed.pop(req.id)
        self.tokens.labels(req.client, "prompt").inc(req.input_tokens)
        self.tokens.labels(req.client, "completion").inc(max(0, output_tokens - counted))  # settled from usage

    def on_cancel(self, req: RequestInfo, generated: int | None, now: float) -> None:
        (self.waiting if generated is None else self.running).labels(req.client).dec()
        self._streamed.pop(req.id, None)

    def on_forget(self, client: str, now: float) -> None:
        """An idle tenant's series leave /metrics (its counters restart from zero if it returns, which Prometheus'
        rate() reads as a reset)."""
        for metric, labels in (
            (self.waiting, [()]),
            (self.running, [()]),
            (self.tokens, TOKEN_KINDS),
            (self.requests, OUTCOMES),
        ):
            for rest in labels:
                with contextlib.suppress(KeyError):
                    metric.remove(client, *rest)
