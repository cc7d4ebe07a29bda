"""Gateways sharing one Redis store (`--state`): fairness across gateway processes under skewed ingress, against
independent gateways on the same load; a killed gateway and a restarted store. Real processes on loopback: a
redis-server, three fake engines, the gateways, and the official openai client (`lab.fleet_bench`)."""

import os
import shutil

import pytest

from lab.fleet_bench import DYNAMO, SKEWED, Engines, Tenant, run, summary

pytestmark = [pytest.mark.served, pytest.mark.slow]

if shutil.which("redis-server") is None and shutil.which("valkey-server") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install redis-server (see .ci/run)")
    pytest.skip("no redis-server here: apt-get install redis-server", allow_module_level=True)


def _shares(tenants, **kw):
    weights = {t.name: t.weight for t in tenants}
    return summary(run(tenants, **kw), weights)


def test_two_gateways_with_shared_state_hold_the_light_tenants_share_that_independent_ones_lose():
    """The heavy tenant sends through both gateways, the light one through A only: with one counter the light
    tenant gets half the service; with independent gateways about a quarter."""
    shared = _shares(SKEWED, n_gateways=2, shared=True)
    independent = _shares(SKEWED, n_gateways=2, shared=False)
    assert abs(shared["shares"]["light"] - 0.5) <= 0.05, shared
    assert independent["shares"]["light"] < 0.35, independent
    assert not shared["errors"] and not independent["errors"]
    assert shared["requests_per_s"] >= 0.9 * independent["requests_per_s"], (shared, independent)  # 0.96 measured


def test_three_gateways_and_dynamos_weighted_case():
    three = _shares([Tenant("heavy", [0, 1, 2]), Tenant("light", [0])], n_gateways=3, shared=True)
    assert abs(three["shares"]["light"] - 0.5) <= 0.05, three
    weighted = _shares(DYNAMO, n_gateways=2, shared=True)  # 4:1 weights, one tenant per gateway
    assert abs(weighted["shares"]["x"] - 0.8) <= 0.08, weighted
    collapsed = _shares(DYNAMO, n_gateways=2, shared=False)
    assert collapsed["shares"]["x"] < 0.65, collapsed  # each router sees one tenant: about 1:1


def test_a_killed_gateway_loses_only_its_in_flight_requests_and_the_other_keeps_the_shares():
    r = run(SKEWED, n_gateways=2, shared=True, seconds=9.0, kill_gateway_at=3.0, measure_from=6.0)
    assert r.ok[0] > 0 and not r.errors[0]  # gateway A: every request answered
    assert 0 < len(r.errors[1]) <= 24  # B's clients: each stream's request then (in flight or waiting)
    share = r.shares({"heavy": 1.0, "light": 1.0})["light"]
    assert abs(share - 0.5) <= 0.05, share  # after B's heartbeat expired, A serves both tenants fairly


def test_a_store_restart_mid_run_keeps_serving_and_the_shares_recover():
    r = run(SKEWED, n_gateways=2, shared=True, seconds=10.0, restart_store=(2.0, 3.5), measure_from=5.5)
    assert not r.errors[0] and not r.errors[1]  # local counters while the store was away
    assert r.state_down_seen  # /metrics said so
    share = r.shares({"heavy": 1.0, "light": 1.0})["light"]
    assert abs(share - 0.5) <= 0.05, share


def test_the_learned_limit_keeps_the_queue_at_the_gateway_in_front_of_an_engine_that_batches_everything():
    """One engine that batches every request (throughput flat past 4 at once, every request starting at once): the
    heavy tenant keeps twice the light one's requests open. A limit learned from throughput stops near 4, so the
    queue (and VTC's order) stays at the gateway; a limit of 48 lets it form inside the engine, first come first
    served, where the light tenant gets a third."""
    batching = ("--batch-knee", "4", "--step-s", "0.01")
    tenants = [Tenant("heavy", [0], streams=48), Tenant("light", [0], streams=24)]
    learned = _shares(tenants, n_gateways=1, shared=False, seconds=14.0, warmup_s=6.0,
                      engines=Engines(count=1, args=batching, limit=None))  # fmt: skip
    assert abs(learned["shares"]["light"] - 0.5) <= 0.05, learned
    deep = _shares(tenants, n_gateways=1, shared=False, seconds=8.0, engines=Engines(1, batching, limit=48))
    assert deep["shares"]["light"] < 0.4, deep


def test_idle_tenants_leave_the_shared_counters():
    """Without a tenants file a client names its own tenant: 300 names, each once, leave the store's counters
    within --tenant-idle-s (the heartbeats forget them)."""
    import time

    import httpx
    import redis

    from lab.fleet_bench import fleet

    with fleet(1, True, None, Engines(count=1), gateway_args=("--tenant-idle-s", "1")) as (urls, handles):
        store = redis.Redis(port=handles["redis_port"])
        with httpx.Client(timeout=30) as client:
            for i in range(300):
                body = {"model": "fake", "prompt": "x", "max_tokens": 1, "user": f"rotating-{i}"}
                assert client.post(urls[0] + "/v1/completions", json=body).status_code == 200
        assert store.hlen("fairness:counters") > 0  # the last second's tenants are still there
        deadline = time.monotonic() + 10
        while store.hlen("fairness:counters") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.hlen("fairness:counters") == 0 and store.zcard("fairness:seen") == 0
