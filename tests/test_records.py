"""Metrics from per-request records: by hand, and consistent with the simulator's own accounting."""

import json

import pytest

from fairness import EngineModel, Request, make_workload, simulate
from fairness.measure.records import RequestRecord, paper_window_diffs, record_metrics


def test_record_metrics_by_hand():
    records = [
        RequestRecord("a", 0.0, 10, 10, first_token_s=1.0, finish_s=3.0),  # 30 of service over [1, 3]
        RequestRecord("b", 2.0, 10, 5, first_token_s=2.0, finish_s=4.0),  # 20 over [2, 4]
    ]
    m = record_metrics(records, resolution_s=0.01, window_s=2.0)
    # accumulated service over the arrivals' span [0, 2]: at t = 2, a has 15 and b 0
    assert m.metrics["acc_service_diff"] == pytest.approx(15.0, abs=0.3)
    assert m.per_client["a"]["service"] == pytest.approx(30.0) and m.per_client["b"]["service"] == pytest.approx(20.0)
    assert m.metrics["ttft_p50_s"] == pytest.approx(0.5) and m.metrics["e2e_p50_s"] == pytest.approx(2.5)
    assert m.metrics["throughput_tok_s"] == pytest.approx(15 / 4, rel=0.01)
    assert m.metrics["throughput_in_out_tok_s"] == pytest.approx(35 / 4, rel=0.01)
    # a is backlogged over [0, 1), b never (its first token comes as it arrives): no pair backlogged together
    assert m.metrics["max_service_diff"] == pytest.approx(0.0, abs=0.5)


def test_the_vtc_artifacts_window_difference_by_hand():
    """Ticks at 0 and 2 with 2 s windows: at 0 nobody is served (a and b only ask); over [1, 3] a gets 15/s and b
    5/s, b asked nothing in that window, so b is 5 behind (capped by its demand gap |0 - 5|), a is the best."""
    records = [RequestRecord("a", 0.0, 10, 10, 1.0, 3.0), RequestRecord("b", 0.0, 10, 5, 2.0, 4.0)]
    diffs = paper_window_diffs(records, ["a", "b"], horizon=4.0, window_s=2.0, ticks=2)
    assert diffs.tolist() == pytest.approx([0.0, 5.0])


def test_unfinished_requests_count_no_service_and_weights_divide_it():
    records = [RequestRecord("a", 0.0, 4, 4, 1.0, None), RequestRecord("b", 0.0, 4, 4, 1.0, 2.0, weight=2.0)]
    m = record_metrics(records, resolution_s=0.05)
    assert m.per_client["a"]["service"] == 0 and m.per_client["b"]["service"] == pytest.approx(6.0)
    assert m.metrics["finished"] == 1
    with pytest.raises(ValueError, match="at least one record"):
        record_metrics([])


def test_simulated_records_add_up_to_the_simulators_service():
    res = simulate(make_workload("overload", 60), "vtc", engine=EngineModel.preset("a10g-llama2-7b"))
    assert len(res.records) == res.metrics["requests"]
    m = record_metrics(res.records, resolution_s=0.5)
    for client, numbers in res.per_client.items():
        assert m.per_client[client]["service"] == pytest.approx(numbers["service"], rel=1e-9)
    assert m.metrics["ttft_p50_s"] == pytest.approx(res.metrics["ttft_p50_s"])


@pytest.mark.bench
@pytest.mark.served
def test_loadgen_command_line_against_a_live_server(reference_dir, tmp_path):
    from fairness.serve import BackgroundServer, build_engine
    from fairness.serving.server import create_app
    from lab.loadgen import main

    trace = tmp_path / "trace.jsonl"
    rows = [{"client": c, "arrival_s": t, "input_tokens": 8, "output_tokens": 6} for t, c in enumerate("abab")]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    srv = BackgroundServer(create_app(build_engine(reference_dir, "vtc", device="cpu", max_running=2)))
    url = srv.start()
    try:
        main(["--url", url, "--trace", str(trace), "--speedup", "4", "--duration", "5", "--out", str(tmp_path),
              "--label", "t"])  # fmt: skip
    finally:
        srv.stop()
    saved = json.loads((tmp_path / "loadgen-t.json").read_text())
    assert saved["metrics"]["finished"] == 4 and [r["output_tokens"] for r in saved["records"]] == [6] * 4
    assert {r["client"] for r in saved["records"]} == {"a", "b"}
    assert (tmp_path / "fairness-loadgen-t-service.png").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--url", url, "--trace", str(tmp_path / "none.jsonl")])
    with pytest.raises(ValueError, match="speedup must be > 0"):
        import asyncio

        from lab.loadgen import replay

        asyncio.run(replay(url, "m", [Request("a", 0, 1, 1)], speedup=0))
