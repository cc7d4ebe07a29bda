"""Bounded per-tenant state: without a tenants file any client names its own tenant, so the policies, the gateway's
queues and its metric series forget idle tenants, and a cap on tenants answers 429 past it."""

import asyncio

import httpx
import pytest

from fairness.core.baselines import RPM, VTC, VTCPredicted
from fairness.core.equinox import Equinox
from fairness.core.request import RequestInfo
from fairness.gateway import GatewayConfig
from fairness.gateway.admission import Admission, TooManyTenants
from fairness.gateway.metrics import GatewayMetrics
from fairness.gateway.upstreams import UpstreamPool
from tests.fake_engine import MODEL
from tests.test_gateway import Stack


def _pool() -> UpstreamPool:
    pool = UpstreamPool(["http://127.0.0.1:9000"], 4)
    for u in pool.upstreams:
        u.healthy, u.models = True, frozenset({"m"})
    return pool


def _serve_once(policy, client: str, rid: int, now: float) -> RequestInfo:
    req = RequestInfo(rid, client, now, 10, 5, 1.0)
    policy.add_request(req, now)
    assert policy.next_request(now) == req
    policy.on_admit(req, now)
    policy.on_finish(req, 5, now)
    return req


@pytest.mark.parametrize("make", [VTC, VTCPredicted, Equinox])
def test_a_policy_forgets_an_idle_client_and_a_returning_one_is_lifted_to_the_backlog(make):
    policy = make()
    _serve_once(policy, "gone", 0, 0.0)
    _serve_once(policy, "other", 1, 0.0)  # the last to leave the queue: kept, its counter lifts the next to join
    waiting = RequestInfo(2, "busy", 1.0, 10, 5, 1.0)
    policy.add_request(waiting, 1.0)
    assert not policy.forget("busy", 1.0)  # a request waits: kept
    assert policy.forget("gone", 1.0)
    ledgers = [policy.counter] if isinstance(policy, VTC) else [policy.ufc, policy.rfc]
    assert all("gone" not in ledger.values() for ledger in ledgers)
    assert "gone" not in policy.backlog.clients() and "busy" in policy.backlog.clients()
    back = RequestInfo(3, "gone", 2.0, 10, 5, 1.0)
    policy.add_request(back, 2.0)  # rejoins a backlog: lifted to its smallest counter, no credit banked
    assert all(ledger["gone"] == ledger["busy"] for ledger in ledgers)


def test_rpm_keeps_a_client_its_last_minute_of_starts_still_limits():
    policy = RPM(rpm=1)
    _serve_once(policy, "a", 0, 0.0)
    assert not policy.forget("a", 30.0)
    assert policy.forget("a", 61.0)


def test_a_hundred_thousand_tenant_names_leave_the_policy_and_the_metrics_bounded():
    """One client rotating its tenant name: 100,000 requests, each from a new name, through admission and the
    metrics observer (no HTTP). With tenants forgotten when idle, state stays at a handful of tenants."""

    async def run():
        pool = _pool()
        metrics = GatewayMetrics(pool)
        adm = Admission("vtc", pool, observers=[metrics], tenant_idle_s=0.0, max_tenants=100)
        for i in range(100_000):
            t = adm.arrive(f"tenant-{i}", 1.0, 10, 5, "m")
            assert t.upstream is not None
            adm.tokens(t, 5)
            adm.finish(t, 5, 10)
            metrics.requests.labels(t.info.client, "ok").inc()
        adm.expire(float("inf"))
        policy = adm.policy
        assert len(policy.counter.values()) <= 2 and len(policy.backlog.clients()) <= 2  # the last one is kept
        assert adm.tenants <= 1
        series = sum(len(m.samples) for m in metrics.registry.collect() if m.name.startswith("fairness_gateway_"))
        assert series < 60, series  # upstream gauges, histogram buckets and at most the last tenant's series
        await pool.aclose()

    asyncio.run(run())


def test_past_max_tenants_a_new_tenant_is_refused_and_a_known_one_is_not():
    async def run():
        pool = _pool()
        adm = Admission("vtc", pool, max_tenants=2, tenant_idle_s=3600)
        a = adm.arrive("a", 1.0, 10, 5, "m")
        adm.arrive("b", 1.0, 10, 5, "m")
        with pytest.raises(TooManyTenants, match="at most 2 tenants"):
            adm.arrive("c", 1.0, 10, 5, "m")
        adm.finish(a, 5, 10)
        adm.arrive("a", 1.0, 10, 5, "m")  # known (idle, not yet forgotten): served
        await pool.aclose()

    asyncio.run(run())
    with pytest.raises(ValueError, match="max_tenants >= 1"):
        Admission("vtc", _pool(), max_tenants=0)


@pytest.mark.served
def test_the_gateway_answers_429_past_its_tenant_cap_over_http():
    stack = Stack(engines=1, max_running=2, policy="vtc", config=GatewayConfig(max_tenants=1, tenant_idle_s=3600))
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        assert httpx.post(stack.url + "/v1/completions", json={**body, "user": "a"}, timeout=30).status_code == 200
        r = httpx.post(stack.url + "/v1/completions", json={**body, "user": "b"}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_tenants"
    finally:
        stack.close()


@pytest.mark.served
@pytest.mark.parametrize("charge", ["all", "uncached"])
def test_charge_uncached_discounts_the_prompt_tokens_the_upstream_cache_served(charge):
    """The fake engine reports a repeated prompt's cached tokens as vLLM does; charge="uncached" charges the tenant
    only the rest, "all" (the default, VTC's service) the whole prompt."""
    stack = Stack(engines=1, max_running=2, policy="vtc", config=GatewayConfig(charge=charge))
    try:
        body = {"model": MODEL, "prompt": "a long shared system prompt " * 20, "max_tokens": 1, "user": "a"}
        counter = stack.app.state.gateway.admission.policy.counter
        first = httpx.post(stack.url + "/v1/completions", json=body, timeout=30).json()["usage"]
        after_first = counter["a"]
        again = httpx.post(stack.url + "/v1/completions", json=body, timeout=30).json()["usage"]
        cached = again["prompt_tokens_details"]["cached_tokens"]
        assert first["prompt_tokens_details"]["cached_tokens"] == 0 and cached > 0.9 * again["prompt_tokens"]
        charged = counter["a"] - after_first
        want = again["prompt_tokens"] - (cached if charge == "uncached" else 0) + 2 * again["completion_tokens"]
        assert charged == pytest.approx(want)
    finally:
        stack.close()


def test_an_unknown_charge_is_refused():
    with pytest.raises(ValueError, match="unknown charge 'some'"):
        GatewayConfig(charge="some")
