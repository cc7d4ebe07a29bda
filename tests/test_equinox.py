"""Equinox: the counters and the holistic score on hand-computed examples, reconciliation with actual use, the lift,
adaptive batching, and the policy inside the simulator."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from fairness import EngineModel, Request, RequestInfo, make_policy, make_workload, simulate
from fairness.core.equinox import Equinox, holistic
from fairness.core.features import FEATURES, TARGETS
from fairness.core.ledger import Ledger
from fairness.core.telemetry import Telemetry
from fairness.measure.bound import vtc_bound
from tests.helpers import SMALL, backlogged_workloads


class Fixed:
    """A predictor that predicts the same outcome for every request."""

    def __init__(self, output_tokens=10.0, e2e_s=6.0):
        self.row = np.full(len(TARGETS), np.nan)
        self.row[TARGETS.index("output_tokens")] = output_tokens
        self.row[TARGETS.index("e2e_s")] = e2e_s

    def predict(self, x):
        assert x.shape[1] == len(FEATURES)
        return np.tile(self.row, (len(x), 1))


def info(rid, client, input_tokens=100, arrival=0.0, weight=1.0):
    return RequestInfo(rid, client, arrival, input_tokens, None, weight)


def test_ledger_charges_actual_use_whatever_was_predicted():
    led = Ledger()
    led.admit(1, "a", 100.0)  # ran longer than predicted
    led.accrue(1, 30.0)
    assert led["a"] == 100.0  # within the prediction: nothing more yet
    led.accrue(1, 90.0)
    assert led["a"] == 120.0  # 20 beyond the prediction
    assert led.settle(1) == 120.0 and led["a"] == 120.0
    led.admit(2, "b", 100.0)  # ran shorter: refunded at finish
    led.accrue(2, 40.0)
    led.settle(2)
    assert led["b"] == 40.0
    led.admit(3, "b", 10.0)  # settled at a value computed at finish
    led.accrue(3, 50.0)
    led.settle(3, actual=25.0)
    assert led["b"] == 65.0


def test_holistic_score_by_hand():
    ufc, rfc = {"a": 100.0, "b": 300.0}, {"a": 3.0, "b": 1.0}
    # means 200 and 2: H_a = 0.75 * 0.5 + 0.25 * 1.5 = 0.75, H_b = 0.75 * 1.5 + 0.25 * 0.5 = 1.25
    assert holistic(ufc, rfc, ["a", "b"], 0.75) == pytest.approx({"a": 0.75, "b": 1.25})
    assert holistic(ufc, rfc, ["a", "b"], 1.0) == pytest.approx({"a": 0.5, "b": 1.5})
    assert holistic(ufc, rfc, ["a", "b"], 0.0) == pytest.approx({"a": 1.5, "b": 0.5})
    assert holistic({"a": 0.0}, {"a": 0.0}, ["a"], 0.5) == {"a": 0.0}


def test_counters_by_hand_and_reconciled_with_a_longer_run_than_predicted():
    p = Equinox(predictor=Fixed(output_tokens=10, e2e_s=6.0), alpha=0.5, gamma=0.5, ttft_slo_s=2.0, tpot_slo_s=0.1)
    a = info(0, "a", input_tokens=100)
    p.add_request(a, 0.0)
    assert p.next_request(0.0) == a
    p.on_admit(a, 1.0)
    # predicted: (1 x 100 + 2 x 10) tokens x f, f = 0.5 + 0.5 x min(1, (2 + 0.1 x 10) / 6) = 0.75 -> 90; the prompt
    # (100 actual) is already beyond that
    assert p.ufc["a"] == pytest.approx(100.0)
    assert p.rfc["a"] == pytest.approx(0.0)  # no engine: prefill cost unknown; nothing per token observed yet
    for k in range(50):  # it generates 50 tokens, 5x the prediction, 0.1 s per step, alone in each step
        p.on_step({0: 1}, 0.1, 1.0 + 0.1 * (k + 1))
    assert p.ufc["a"] == pytest.approx(200.0)  # charged as it ran: 100 + 2 x 50
    assert p.rfc["a"] == pytest.approx(5.0)  # 50 steps x 0.1 s x utilisation 1 (no telemetry) / 1 request
    p.on_finish(a, 50, 15.0)
    # actual: e2e 15 s against an SLO of 2 + 0.1 x 50 = 7 s: f = 0.5 + 0.5 x 7 / 15
    assert p.ufc["a"] == pytest.approx(200.0 * (0.5 + 0.5 * 7 / 15))
    assert p.rfc["a"] == pytest.approx(5.0)


def test_resource_counter_splits_a_steps_decode_time_by_each_requests_cost():
    engine = EngineModel(step_overhead_s=0.01, prefill_s_per_token=1e-3, decode_s_per_seq=1e-3,
                         decode_s_per_ctx_token=1e-4)  # fmt: skip
    tel = Telemetry(nvml=False)
    tel.report_estimate(0.0, 0.5)
    p = Equinox(predictor=Fixed(output_tokens=1))
    p.configure(engine, tel)
    a, b = info(0, "a", input_tokens=99), info(1, "b", input_tokens=299)
    p.add_request(a, 0.0)
    p.add_request(b, 0.0)  # both queued before either runs: no lift
    p.on_admit(a, 0.0)
    p.on_admit(b, 0.0)
    assert p.rfc["a"] == pytest.approx(99 * 1e-3)  # prefill at admission: prompt x prefill time per token
    p.on_step({0: 1, 1: 1}, 0.5, 0.5)  # contexts now 100 and 300; the decode part of the step is
    decode_s = 0.01 + 2 * 1e-3 + 400 * 1e-4  # 0.052 s of the 0.5 s step (the rest was someone's prefill)
    cost_a, cost_b = 1e-3 + 100 * 1e-4, 1e-3 + 300 * 1e-4
    p.on_finish(a, 1, 0.5)
    p.on_finish(b, 1, 0.5)
    assert p.rfc["a"] == pytest.approx(99e-3 + decode_s * 0.5 * cost_a / (cost_a + cost_b))
    assert p.rfc["b"] == pytest.approx(299e-3 + decode_s * 0.5 * cost_b / (cost_a + cost_b))


def test_shorter_run_than_predicted_is_refunded():
    p = Equinox(predictor=Fixed(output_tokens=100, e2e_s=1.0), gamma=0.0)
    a = info(0, "a", input_tokens=10)
    p.add_request(a, 0.0)
    p.on_admit(a, 0.0)
    assert p.ufc["a"] == pytest.approx(10 + 2 * 100)
    p.on_step({0: 1}, 0.1, 0.1)
    p.on_finish(a, 1, 0.1)
    assert p.ufc["a"] == pytest.approx(10 + 2 * 1)


def test_lift_and_choice_of_the_smallest_holistic_score():
    p = Equinox(predictor=Fixed(), alpha=0.5)
    p.add_request(info(0, "a"), 0.0)
    p.add_request(info(1, "b"), 0.0)
    for client, u, r in (("a", 500.0, 1.0), ("b", 100.0, 3.0)):
        p.ufc.set(client, u)
        p.rfc.set(client, r)
    # means 300 and 2: H_a = 0.5 x 5/3 + 0.5 x 0.5 = 1.083, H_b = 0.5 x 1/3 + 0.5 x 1.5 = 0.917
    assert p.next_request(0.0).client == "b"
    p.alpha = 1.0
    assert p.next_request(0.0).client == "b"
    p.alpha = 0.0
    assert p.next_request(0.0).client == "a"
    p.add_request(info(2, "c"), 0.0)  # c joins the backlog: each counter lifted to the backlog's smallest
    assert (p.ufc["c"], p.rfc["c"]) == (100.0, 1.0)
    p.alpha = 0.5  # means 233.3 and 1.667: H_a = 1.37, H_b = 1.11, H_c = 0.5 x 0.43 + 0.5 x 0.6 = 0.51
    assert p.next_request(0.0).client == "c"
    p.ufc.set("c", 50.0)
    p.add_request(info(3, "c"), 0.0)  # already backlogged: no lift
    assert p.ufc["c"] == 50.0


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="alpha and gamma"):
        Equinox(alpha=1.5)
    with pytest.raises(ValueError, match="step_slo_s"):
        Equinox(step_slo_s=0)
    with pytest.raises(ValueError, match="kappa_backoff"):
        Equinox(kappa_backoff=1.5)
    with pytest.raises(FileNotFoundError, match="train one"):
        Equinox(predictor=tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="predict"):
        Equinox(predictor=42)

    class WrongShape:
        def predict(self, x):
            return np.zeros((1, 2))

    with pytest.raises(ValueError, match="expected \\(1, 5\\)"):
        Equinox(predictor=WrongShape()).add_request(info(0, "a"), 0.0)


def test_adaptive_token_budget_keeps_steps_within_the_target():
    p = Equinox(predictor=Fixed(), step_slo_s=0.2, min_chunk=64)
    engine = EngineModel.preset("a10g-llama2-7b")
    p.configure(engine, None)
    for rid in range(20):
        r = info(rid, f"c{rid % 3}", input_tokens=300)
        p.add_request(r, 0.0)
        p.on_admit(r, 0.0)
    tokens, running = p.batch_limits(0.0)
    decodes, ctx = 20, 20 * 300
    assert engine.step_seconds(tokens - decodes, decodes, ctx) <= 0.2 + 1e-9
    assert engine.step_seconds(tokens - decodes + 10, decodes, ctx) > 0.2  # the largest such budget
    assert running == engine.max_running
    p.step_slo_s = 0.01  # a target the decodes alone exceed: prefill still gets min_chunk tokens
    assert p.batch_limits(0.0)[0] == 64 + decodes


def test_equinox_in_the_simulator_preempts_less_and_never_stalls_decodes():
    reqs = [Request(c, t * 0.25, 256, 256) for t in range(800) for c in "AB"]
    stalls = []

    class Spy(Equinox):
        prev: set = set()

        def on_step(self, generated, step_s, now):
            stalls.extend(self.prev - set(generated))  # decoding last step, still running: must decode again
            super().on_step(generated, step_s, now)
            self.prev = set(generated)

        def on_finish(self, req, output_tokens, now):
            self.prev.discard(req.id)
            super().on_finish(req, output_tokens, now)

        def on_preempt(self, req, now):
            self.prev.discard(req.id)
            super().on_preempt(req, now)

    engine = EngineModel.preset("a10g-llama2-7b")
    adaptive = simulate(reqs, Spy(), engine=engine, until_s=200)
    static = simulate(reqs, Equinox(adaptive=False), engine=engine, until_s=200)
    vtc = simulate(reqs, "vtc", engine=engine, until_s=200)
    assert stalls == []
    assert adaptive.metrics["preemptions"] < 0.5 * static.metrics["preemptions"]
    assert adaptive.metrics["throughput_tok_s"] > vtc.metrics["throughput_tok_s"]
    assert adaptive.metrics["jain"] > 0.99


def test_equinox_reads_the_simulators_estimate_through_telemetry():
    p = make_policy("equinox")
    simulate([Request("a", 0, 64, 16), Request("b", 0, 64, 16)], p, engine=SMALL)
    sample = p.telemetry.latest()
    assert sample.source == "estimate" and 0 < sample.gpu_util <= 1


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backlogged_workloads())
def test_token_only_equinox_keeps_vtcs_bound(requests):
    """With gamma = 0 and alpha = 1 the user counter is VTC's (charged with predictions): the 2U bound holds."""
    res = simulate(requests, Equinox(gamma=0.0, alpha=1.0), engine=SMALL, until_s=60)
    assert res.metrics["max_service_diff"] <= vtc_bound(requests, SMALL.kv_tokens)


def test_an_observer_changes_nothing_equinox_keeps_adaptive_batching():
    """Regression: the MoPE log recorder used to wrap the policy and dropped its batch_limits hook."""
    from fairness.mope import model as mope

    reqs = [Request(c, t * 0.25, 256, 256) for t in range(400) for c in "AB"]
    engine = EngineModel.preset("a10g-llama2-7b")
    plain = simulate(reqs, Equinox(), engine=engine, until_s=100)
    recorder = mope._Recorder()
    observed = simulate(reqs, Equinox(), engine=engine, until_s=100, observers=[recorder])
    timing = {"decision_us", "arrival_us", "step_us"}
    assert {k: v for k, v in plain.metrics.items() if k not in timing} == {
        k: v for k, v in observed.metrics.items() if k not in timing
    }
    assert sum("y" in r for r in recorder.rows.values()) == observed.metrics["finished"]


def test_logs_can_be_collected_under_the_oracle():
    """Regression: collect(policy="vtc-oracle") raised KeyError: the oracle never got the true lengths."""
    from fairness.mope import model as mope

    data = mope.collect(make_workload("overload", 60), EngineModel.preset("a10g-llama2-7b"), policy="vtc-oracle")
    assert len(data) > 0
    with pytest.raises(TypeError, match="not an oracle"):
        make_policy("vtc").set_oracle({0: 1})
