"""The fairness bound of a fleet, property-tested: 2-4 gateways' admission objects over one real store, tenants that
stay backlogged through random gateways, random request sizes and flush periods. On every prefix of the run, the
service of any two tenants differs by at most VTC's 2U plus N ticks of streamed tokens (docs/gateway.md)."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairness.core.service import W_P, W_Q
from fairness.gateway.fleet import FleetAdmission
from fairness.gateway.store import SharedState
from fairness.gateway.upstreams import UpstreamPool
from tests.servers import free_port, redis_server

pytestmark = pytest.mark.slow

MAX_IN, MAX_OUT = 20, 20
U = W_P * MAX_IN + W_Q * MAX_OUT  # the most service one request can bring
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def store_url():
    port = free_port()
    proc = redis_server(port)
    yield f"redis://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def fleet_case():
    return st.fixed_dictionaries(
        {
            "gateways": st.integers(2, 4),
            "tenants": st.integers(2, 4),
            "slots": st.integers(1, 6),
            "tick": st.integers(1, 3),  # steps (one token per running request) between flushes
            "steps": st.integers(20, 60),
            "seed": st.integers(0, 2**16),
        }
    )


async def simulate(url: str, case: dict) -> None:
    rng = random.Random(case["seed"])
    n, slots, tick = case["gateways"], case["slots"], case["tick"]
    prefix = f"bound{next(_prefixes)}:"
    gws = []
    for g in range(n):
        pool = UpstreamPool(["http://u"], slots)
        pool.upstreams[0].healthy, pool.upstreams[0].models = True, frozenset({"m"})
        gws.append(FleetAdmission(SharedState(url, f"g{g}", prefix=prefix), "vtc", pool))
    for g in gws:
        g.sync()
        await g.drained()
    tenants = [f"t{i}" for i in range(case["tenants"])]
    routes = {t: rng.sample(range(n), rng.randint(1, n)) for t in tenants}  # the gateways each tenant reaches
    served = dict.fromkeys(tenants, 0.0)  # service received so far: prompts at admission, W_Q per output token
    length, started = {}, set()

    def top_up() -> None:  # every tenant keeps requests waiting: all stay backlogged
        for t in tenants:
            waiting = sum(1 for g in gws for tk in g.waiting.values() if tk.info.client == t)
            for _ in range(2 - waiting):
                tk = gws[rng.choice(routes[t])].arrive(t, 1.0, rng.randint(1, MAX_IN), MAX_OUT, "m")
                length[tk.info.id] = rng.randint(1, MAX_OUT)

    slack = n * W_Q * slots * tick  # N ticks of streamed tokens
    for step in range(case["steps"]):
        top_up()
        for g in gws:
            g.pump()
            await g.drained()
        for g in gws:
            for tk in list(g.running.values()):
                if tk.info.id not in started:
                    started.add(tk.info.id)
                    served[tk.info.client] += W_P * tk.info.input_tokens
                g.tokens(tk, 1)
                served[tk.info.client] += W_Q
                if tk.generated >= length[tk.info.id]:
                    g.finish(tk, tk.generated, tk.info.input_tokens)
            if step % tick == 0:
                g.step()
            await g.drained()
        assert max(served.values()) - min(served.values()) <= 2 * U + slack, (step, served, case)
    for g in gws:
        await g.aclose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=fleet_case())
def test_any_two_backlogged_tenants_services_differ_by_at_most_2u_plus_n_ticks(store_url, case):
    asyncio.run(simulate(store_url, case))
