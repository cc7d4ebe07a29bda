"""The VTC paper's experiments: its workloads as its artifact generates them, the S-LoRA engine mode and preset,
and VTC's 2U bound over every jointly backlogged sub-interval, with weights, where nothing is preempted."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairness import EngineModel, Request, simulate
from fairness.core.driver import EngineObserver
from fairness.measure.bound import vtc_bound
from fairness.sim.vtc_suite import SUITE, workload
from lab.vtc_paper import artifact_reference

pytestmark = pytest.mark.bench  # tests of the lab's tools (the VTC paper's reproduction)

SLORA = EngineModel.preset("a10g-llama2-7b-slora")


def _fingerprint(requests: list[Request]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in requests:
        row = out.setdefault(r.client.removeprefix("client-").removeprefix("model-"), [0, 0, 0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + r.input_tokens, row[2] + r.output_tokens
    return out


@pytest.mark.parametrize("name", [*SUITE, "real"])
def test_workloads_are_the_requests_of_the_papers_runs(name):
    """Per client: the number of requests and their input and output tokens equal those the artifact's published
    runs of the workload served (adapter i = client-i, or model-i in the real trace)."""
    runs = [r for (w, _), r in artifact_reference().items() if w == name and r["finished"] == r["requests"]]
    assert runs, f"the artifact publishes no complete run of {name} as the paper configures it"
    ours = _fingerprint(workload(name))
    for run in runs:
        theirs = {c.removeprefix("dummy-lora-7b-rank-8-"): v for c, v in run["per_client"].items()}
        assert ours == theirs, run["artifact_dir"]
    assert workload(name) == workload(name)  # numpy seed 42: the same requests every time


def test_unknown_workload_is_refused():
    with pytest.raises(ValueError, match="unknown VTC workload 'overlaod'"):
        workload("overlaod")


class _KvWatch(EngineObserver):
    """The KV a request holds (input + generated tokens) summed over admitted requests, at its peak."""

    def __init__(self) -> None:
        self.held: dict[int, int] = {}
        self.peak = 0

    def on_admit(self, req, now):
        self.held[req.id] = req.input_tokens

    def on_step(self, generated, step_s, now):
        for rid, n in generated.items():
            self.held[rid] += n
        self.peak = max(self.peak, sum(self.held.values()))

    def on_finish(self, req, output_tokens, now):
        del self.held[req.id]


def test_slora_mode_reserves_full_outputs_and_never_preempts():
    watch = _KvWatch()
    res = simulate(workload("poisson_short_long_2"), "vtc", engine=SLORA, observers=[watch], until_s=200)
    assert res.metrics["preemptions"] == 0
    assert 0.9 * SLORA.kv_tokens < watch.peak <= SLORA.kv_tokens  # the pool is used, and never exceeded
    chunked = simulate(workload("poisson_short_long_2"), "vtc", engine=EngineModel(kv_tokens=10_000), until_s=200)
    assert chunked.metrics["preemptions"] > 0  # the other mode admits optimistically and preempts


def test_slora_preset_calibration_holds_the_authors_throughput():
    """A check of the preset's calibration (its step model was scaled to this workload), not of the simulator."""
    res = simulate(workload("overload"), "vtc", engine=SLORA)
    assert 876 <= res.metrics["throughput_in_out_tok_s"] <= 903  # the authors' A10G: 876-903 input + output tok/s


def test_records_carry_every_request():
    reqs = workload("on_off_less")
    res = simulate(reqs, "fcfs", engine=SLORA)
    assert len(res.records) == len(reqs)
    assert sorted((r.client, r.arrival_s, r.input_tokens) for r in res.records) == sorted(
        (r.client, r.arrival_s, r.input_tokens) for r in reqs
    )
    assert all(r.arrival_s <= r.first_token_s <= r.finish_s for r in res.records)


@st.composite
def weighted_backlogs(draw):
    """2-4 weighted clients, each over capacity on its own, with random request sizes, for 90 s."""
    reqs = []
    for c in range(draw(st.integers(2, 4))):
        rate, weight = draw(st.floats(1.0, 5.0)), draw(st.sampled_from([1.0, 2.0, 3.0]))
        n_in, n_out = draw(st.integers(8, 400)), draw(st.integers(8, 400))
        t = draw(st.floats(0, 1))
        while t < 90:
            reqs.append(Request(f"c{c}", t, n_in, n_out, n_out, weight))
            t += 1.0 / rate
    return reqs


SMALL_SLORA = EngineModel(kv_tokens=3000, max_step_tokens=1024, max_running=64, mode="slora")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weighted_backlogs())
def test_vtc_bound_holds_over_every_backlogged_sub_interval(requests):
    """|W_f(t1, t2) - W_g(t1, t2)| <= 2U for every interval in which f and g are both backlogged, with
    U = max(w_p x max input, w_q x M) / smallest weight and M the KV pool (the most tokens a batch can hold)."""
    res = simulate(requests, "vtc", engine=SMALL_SLORA, until_s=90)
    assert res.metrics["preemptions"] == 0
    assert res.metrics["worst_interval_service_diff"] <= vtc_bound(requests, SMALL_SLORA.kv_tokens)


def test_worst_sub_interval_exceeds_the_since_backlog_measure_and_fcfs_breaks_the_bound():
    reqs = workload("overload")
    vtc, fcfs = (simulate(reqs, p, engine=SLORA) for p in ("vtc", "fcfs"))
    bound = vtc_bound(reqs, SLORA.kv_tokens)
    assert vtc.metrics["worst_interval_service_diff"] >= vtc.metrics["max_service_diff"]
    assert vtc.metrics["worst_interval_service_diff"] <= bound < fcfs.metrics["worst_interval_service_diff"]
