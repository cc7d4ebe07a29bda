"""The fairness package: VTC's guarantee, what policies may see, the simulator's accounting, trace loaders."""

import csv
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fairness
from fairness import EngineModel, Request, TraceFormatError, simulate
from fairness.core.baselines import FCFS, VTC
from fairness.core.request import RequestInfo
from fairness.measure.bound import vtc_bound
from fairness.measure.metrics import jain_index
from tests.helpers import SMALL, backlogged_workloads


def test_jain_index():
    assert jain_index([5, 5, 5]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([1, 2]) == pytest.approx(0.9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backlogged_workloads())
def test_vtc_guarantee_holds_on_random_workloads(requests):
    res = simulate(requests, "vtc", engine=SMALL, until_s=60)
    assert res.metrics["max_service_diff"] <= vtc_bound(requests, SMALL.kv_tokens)


def test_fcfs_breaks_the_bound_that_vtc_keeps_on_overload():
    requests = fairness.make_workload("overload", duration_s=300)
    engine = EngineModel.preset("a10g-llama2-7b")
    bound = vtc_bound(requests, engine.kv_tokens)
    fcfs = simulate(requests, "fcfs", engine=engine, until_s=300)
    vtc = simulate(requests, "vtc", engine=engine, until_s=300)
    assert fcfs.metrics["max_service_diff"] > bound
    assert vtc.metrics["max_service_diff"] <= bound
    a, b = vtc.per_client["A"]["service"], vtc.per_client["B"]["service"]
    assert abs(a - b) <= bound  # equal service although A asks twice as much
    assert fcfs.per_client["A"]["service"] > 1.5 * fcfs.per_client["B"]["service"]


def test_weighted_vtc_serves_in_proportion_to_weights():
    reqs = [Request("heavy", t / 4, 128, 128, weight=2.0) for t in range(1200)]
    reqs += [Request("light", t / 4 + 0.1, 128, 128, weight=1.0) for t in range(1200)]
    res = simulate(reqs, "vtc", engine=SMALL, until_s=240)
    raw_heavy = res.per_client["heavy"]["service"] * 2.0  # service is reported divided by the weight
    raw_light = res.per_client["light"]["service"]
    assert raw_heavy / raw_light == pytest.approx(2.0, rel=0.1)


class Spy(VTC):
    name = "spy"

    def __init__(self):
        super().__init__()
        self.seen = []

    def add_request(self, req, now):
        self.seen.append(req)
        super().add_request(req, now)

    def on_finish(self, req, output_tokens, now):
        self.seen.append(req)
        super().on_finish(req, output_tokens, now)


def test_policies_never_see_true_output_lengths():
    reqs = fairness.make_workload("poisson-short-long", duration_s=30)
    spy = Spy()
    simulate(reqs, spy, engine=SMALL)
    assert spy.seen and all(type(r) is fairness.RequestInfo for r in spy.seen)  # RequestInfo has no output length


def test_simulator_accounting():
    reqs = fairness.make_workload("sharegpt-like", duration_s=60)
    res = simulate(reqs, "vtc-pred", engine=SMALL)
    m = res.metrics
    assert m["finished"] == m["requests"] == len(reqs)  # runs to completion without until_s
    total_out = sum(r.output_tokens for r in reqs)
    assert m["throughput_tok_s"] * m["makespan_s"] == pytest.approx(total_out)
    service = sum(c["service"] for c in res.per_client.values())
    assert service == pytest.approx(sum(r.input_tokens + 2 * r.output_tokens for r in reqs))
    assert m["ttft_p50_s"] > 0 and m["ttft_p99_s"] >= m["ttft_p50_s"]
    assert 0 < m["utilization"] <= 1.0 + 1e-9


def test_preemption_under_kv_pressure_still_finishes_everything():
    tight = EngineModel(kv_tokens=1200, max_step_tokens=256, max_running=64)
    reqs = [Request(f"c{i % 3}", i * 0.05, 100, 400) for i in range(60)]  # prompts fit, full outputs do not
    res = simulate(reqs, "fcfs", engine=tight)
    assert res.metrics["finished"] == 60
    service = sum(c["service"] for c in res.per_client.values())
    assert service == pytest.approx(60 * (100 + 2 * 400))  # recomputed prefills are not counted as service
    m = res.metrics
    assert m["preemptions"] > 0 and m["recomputed_tokens"] > 0
    assert m["prefilled_tokens"] == 60 * 100 + m["recomputed_tokens"]  # every other prefilled token is recomputation
    assert m["useful_compute_utilization"] < m["compute_utilization"] <= m["utilization"]


def test_rpm_caps_requests_per_minute():
    reqs = [Request("A", i * 0.1, 16, 16) for i in range(100)]
    res = simulate(reqs, fairness.make_policy("rpm", rpm=10), engine=SMALL, until_s=59)
    assert res.metrics["finished"] <= 10


def test_register_a_custom_policy():
    class Lifo(FCFS):
        name = "lifo"

        def next_request(self, now):
            return self._queue[-1] if self._queue else None

    fairness.register_policy("lifo", Lifo)
    try:
        assert "lifo" in fairness.policy_names()
        one_at_a_time = EngineModel(kv_tokens=4000, max_step_tokens=512, max_running=1)
        res = simulate([Request("a", 0, 10, 10), Request("b", 0, 20, 10)], "lifo", engine=one_at_a_time)
        assert [r.input_tokens for r in res.records] == [10, 20]
        assert res.records[1].first_token_s < res.records[0].first_token_s  # the last arrival went first
    finally:
        fairness.unregister_policy("lifo")
    assert "lifo" not in fairness.policy_names()
    with pytest.raises(ValueError, match="unknown scheduling policy 'nope'"):
        fairness.make_policy("nope")
    assert fairness.make_policy(lambda: fairness.make_policy("fcfs")).name == "fcfs"  # a factory is called
    with pytest.raises(TypeError, match="factory must return a SchedulingPolicy, not dict"):
        fairness.make_policy(dict)
    with pytest.raises(TypeError, match="registered name, a factory or a SchedulingPolicy, not int"):
        fairness.make_policy(3)


def test_bad_requests_and_engines_are_refused():
    with pytest.raises(ValueError, match="output_tokens >= 1"):
        Request("a", 0, 10, 0)
    with pytest.raises(ValueError, match="weights must be > 0"):
        Request("a", 0, 10, 10, weight=0)
    with pytest.raises(ValueError, match="KV tokens"):
        simulate([Request("a", 0, 5000, 10)], "fcfs", engine=SMALL)
    with pytest.raises(ValueError, match="unknown engine preset"):
        EngineModel.preset("tpu-v9")
    with pytest.raises(ValueError, match="at least one request"):
        simulate([], "fcfs")


def test_engine_fit_recovers_coefficients():
    truth = EngineModel(
        step_overhead_s=0.01, prefill_s_per_token=2e-4, decode_s_per_seq=3e-4, decode_s_per_ctx_token=1e-6
    )
    samples = [(p, d, c, truth.step_seconds(p, d, c)) for p in (0, 128, 512) for d in (1, 8, 32) for c in (100, 5000)]
    fit = EngineModel.fit(samples)
    for name in ("step_overhead_s", "prefill_s_per_token", "decode_s_per_seq", "decode_s_per_ctx_token"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    with pytest.raises(ValueError, match="at least 4"):
        EngineModel.fit(samples[:2])


# --- trace loaders ----------------------------------------------------------------------------------------------


def test_azure_csv_round_trip(tmp_path):
    path = tmp_path / "azure.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        w.writerow(["2023-11-16 18:15:46.6805900", 374, 44])
        w.writerow(["2023-11-16 18:15:50.9951690", 396, 109])
    reqs = fairness.load_azure_csv(path)
    assert [(r.input_tokens, r.output_tokens) for r in reqs] == [(374, 44), (396, 109)]
    assert reqs[0].arrival_s == 0 and reqs[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert reqs == fairness.load_azure_csv(path)  # client assignment is deterministic


def test_vtc_and_lmsys_jsonl_round_trip(tmp_path):
    path = tmp_path / "arena.jsonl"
    rows = [
        {"client": "m1", "arrival_s": 0.5, "input_tokens": 12, "output_tokens": 30},
        {"client": "m2", "arrival_s": 1.5, "input_tokens": 7, "output_tokens": 3},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reqs = fairness.load_jsonl(path)
    assert [(r.client, r.arrival_s, r.input_tokens, r.output_tokens) for r in reqs] == [tuple(r.values()) for r in rows]
    chat = tmp_path / "lmsys.jsonl"
    conv = {
        "model": "vicuna-13b",
        "conversation": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 400}],
    }
    chat.write_text(json.dumps(conv) + "\n")
    (r,) = fairness.load_jsonl(chat)
    assert (r.client, r.input_tokens, r.output_tokens) == ("vicuna-13b", 10, 100)


def test_sharegpt_round_trip(tmp_path):
    path = tmp_path / "sharegpt.json"
    data = [
        {
            "id": "a",
            "conversations": [
                {"from": "human", "value": "q" * 80},
                {"from": "gpt", "value": "a" * 800},
                {"from": "human", "value": "q" * 8},
                {"from": "gpt", "value": "a" * 4},
            ],
        }
    ]
    path.write_text(json.dumps(data))
    reqs = fairness.load_sharegpt(path)
    assert [(r.input_tokens, r.output_tokens) for r in reqs] == [(20, 200), (2, 1)]


@pytest.mark.parametrize(
    ("name", "content", "loader", "match"),
    [
        ("a.csv", "time,in,out\n1,2,3\n", "load_azure_csv", "expected a CSV header"),
        ("b.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,5,5\n", "load_azure_csv", r"b.csv:2: bad row"),
        (
            "c.jsonl",
            '{"client": "a", "arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n{oops\n',
            "load_jsonl",
            r"c.jsonl:2: not a request record",
        ),
        ("d.jsonl", '{"prompt": "hi"}\n', "load_jsonl", r"d.jsonl:1: not a request record"),
        ("e.json", '{"not": "a list"}', "load_sharegpt", "expected a JSON list"),
        ("f.json", "[{]", "load_sharegpt", "not JSON"),
        ("g.json", '[{"conversations": [{"from": "human"}, {"from": "gpt"}]}]', "load_sharegpt", "malformed turn"),
        ("h.jsonl", "", "load_jsonl", "no requests"),
    ],
)
def test_malformed_traces_get_clear_errors(tmp_path, name, content, loader, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TraceFormatError, match=match):
        getattr(fairness, loader)(path)


def test_missing_trace_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fairness.load_jsonl(tmp_path / "none.jsonl")


def test_bundled_real_traces_load():
    azure = fairness.load_trace(fairness.bundled_trace("azure-llm-2023-conv.csv"))
    arena = fairness.load_trace(fairness.bundled_trace("lmsys-arena-vtc.jsonl"))
    assert len(azure) == 19366 and len(arena) == 1500
    assert len({r.client for r in arena}) == 27
    assert math.isclose(max(r.arrival_s for r in arena), 600, rel_tol=0.01)
    with pytest.raises(FileNotFoundError, match="the package ships"):
        fairness.bundled_trace("sharegpt.json")
    with pytest.raises(TraceFormatError, match="unknown trace type '.txt'"):
        fairness.load_trace("trace.txt")


def test_vtc_preempts_the_most_served_client():
    vtc = VTC()
    infos = [fairness.RequestInfo(i, c, 0.0, 10, None, 1.0) for i, c in enumerate(["a", "b", "b", "a"])]
    for r in infos:
        vtc.add_request(r, 0.0)
    for r in infos:
        vtc.on_admit(r, 0.0)
    vtc.on_step({1: 5}, 0.1, 0.1)  # b has received more service
    assert vtc.preemption_victim(infos).id == 2  # b's newest, not the newest overall (a's)
    assert fairness.make_policy("fcfs").preemption_victim(infos).id == 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["arrive", "admit", "step", "finish", "preempt", "cancel"]),
                          st.integers(0, 5), st.integers(1, 400)), min_size=1, max_size=120),  # fmt: skip
       st.sampled_from(["vtc", "vtc-pred", "lcf"]))  # fmt: skip
def test_the_indexed_pick_is_the_scan_under_any_sequence_of_events(ops, name):
    """VTC's O(log n) pick returns exactly the request a scan of every backlogged client would, whatever happened:
    arrivals, admissions, tokens, finishes that refund a prediction, preemptions, cancellations."""
    policy = fairness.make_policy(name)
    ids = iter(range(10_000))
    running: list = []
    now = 0.0
    for op, client, n in ops:
        now += 0.01
        scan = policy.backlog.pick(lambda c: policy.counter[c])
        assert policy.backlog.pick_least(policy.counter) is scan
        if op == "arrive":
            policy.add_request(RequestInfo(next(ids), f"c{client}", now, n, 2 * n, 1.0 + client % 2), now)
        elif op == "admit" and scan is not None:
            policy.on_admit(scan, now)
            running.append(scan)
        elif op == "step" and running:
            policy.on_step({r.id: 1 + n % 7 for r in running}, 0.01, now)
        elif op in ("finish", "preempt", "cancel") and running:
            r = running.pop(n % len(running))
            if op == "finish":
                policy.on_finish(r, n % 50, now)
            elif op == "preempt":
                policy.on_preempt(r, now)
            else:
                policy.on_cancel(r, n % 50, now)
        elif op == "cancel" and scan is not None:
            policy.on_cancel(scan, None, now)
    assert policy.backlog.pick_least(policy.counter) is policy.backlog.pick(lambda c: policy.counter[c])


def test_the_indexed_pick_sees_a_refund_that_lowers_a_counter():
    """A finish that refunds VTC-pred's unused prediction lowers the client's counter below the key the index holds
    for it: the next pick must be that client, as a scan finds."""
    policy = fairness.make_policy("vtc-pred", default_tokens=100)
    reqs = [RequestInfo(0, "c0", 0.0, 10, 100, 1.0), RequestInfo(1, "c1", 1.0, 1, 10, 1.0),
            RequestInfo(2, "c0", 2.0, 10, 100, 1.0), RequestInfo(3, "c1", 3.0, 1, 10, 1.0)]  # fmt: skip
    for r in reqs:
        policy.add_request(r, r.arrival_s)
    for want in (0, 1):
        assert policy.next_request(4.0).id == want
        policy.on_admit(reqs[want], 4.0)
    assert policy.next_request(4.0).id == 3  # c1 (1 + 2 x 10 = 21) below c0 (10 + 2 x 100 = 210)
    policy.on_finish(reqs[0], 1, 5.0)  # c0 settles at 10 + 2 x 1 = 12 < 21
    assert policy.counter["c0"] == 12 and policy.next_request(5.0).id == 2


def test_the_indexed_pick_sees_a_preempted_request_back_at_the_front():
    policy = fairness.make_policy("vtc")
    reqs = [RequestInfo(i, c, float(i), 10, None, 1.0) for i, c in enumerate(["c0", "c1", "c0", "c1"])]
    for r in reqs:
        policy.add_request(r, r.arrival_s)
    for want in (0, 1):
        assert policy.next_request(4.0).id == want
        policy.on_admit(reqs[want], 4.0)
    assert policy.next_request(4.0).id == 2  # equal counters: the older head (c0's, at 2.0)
    policy.on_preempt(reqs[1], 4.0)  # c1's first request, older than c0's head, is back at the front of its queue
    assert policy.next_request(4.0).id == 1
