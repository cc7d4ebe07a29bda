"""The cluster simulator: N replicas behind one policy, or behind per-replica policies and a load balancer."""

import pytest

from fairness.core.request import Request
from fairness.sim.cluster import ClusterSimulator, cluster_workload, simulate_cluster


def test_one_counter_for_all_replicas_is_fairer_than_a_counter_per_replica_at_the_same_throughput():
    reqs = cluster_workload(tenants=500, rate_per_s=100, duration_s=40, seed=1)
    assert len({r.client for r in reqs}) > 100 and len(reqs) == 4000
    runs = {mode: simulate_cluster(reqs, "vtc", replicas=8, mode=mode, window_s=10) for mode in
            ("global", "round-robin", "least-loaded")}  # fmt: skip
    g = runs["global"]
    for mode in ("round-robin", "least-loaded"):
        assert g["jain"] > runs[mode]["jain"] + 0.05 and g["within_10pct"] > runs[mode]["within_10pct"]
        assert g["throughput_tok_s"] == pytest.approx(runs[mode]["throughput_tok_s"], rel=0.05)
    assert g["decision_us"] > 0 and g["policy_us_per_request"] >= g["decision_us"] / 10


def test_round_robin_spreads_requests_and_global_fcfs_serves_in_arrival_order():
    reqs = [Request(f"c{i % 3}", 0.01 * i, 100, 5) for i in range(30)]
    sim = ClusterSimulator(reqs, "fcfs", replicas=3, mode="round-robin")
    sim.run(until_s=10.0)
    assert sim.finished == 30 and all(r.outstanding == 0 for r in sim.replicas)
    assert simulate_cluster(reqs, "fcfs", replicas=3, mode="global", until_s=10.0)["finished"] == 30


def test_bad_cluster_arguments_are_refused():
    reqs = [Request("a", 0.0, 10, 2)]
    with pytest.raises(ValueError, match="unknown cluster mode"):
        ClusterSimulator(reqs, "vtc", mode="random")
    with pytest.raises(ValueError, match="at least one replica"):
        ClusterSimulator(reqs, "vtc", replicas=0)
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        ClusterSimulator(reqs, "nope")
