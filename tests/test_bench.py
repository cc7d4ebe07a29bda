"""The benchmarks' code paths on tiny settings: complete JSON, numbers consistent with stats(), no timing asserted."""

import json
from pathlib import Path

import pytest


def test_offload_bench_json_is_complete_and_consistent(tmp_path, reference_dir):
    from offload_moe.bench import main

    main(["--mode", "quick", "--model", str(reference_dir), "--out", str(tmp_path), "--prompts", "1",
          "--prompt-len", "16", "--eval-bytes", "300", "--link-gbps", "50"])  # fmt: skip
    result = json.loads((tmp_path / "offload.json").read_text())
    assert result["link"] == {**result["link"], "emulated": True, "gbps": 50}
    fields = {"name", "budget", "prefetch", "fallback", "decode_tokens_per_s", "prefill_tokens_per_s", "hit_rate",
              "misses_per_token", "bytes_per_token", "bits_per_byte",
              "peak_device_bytes"}  # fmt: skip
    runs = {(r["name"], r["budget"]): r for r in result["runs"]}
    assert all(fields <= set(r) for r in result["runs"])
    assert {name for name, _ in runs} >= {"resident", "naive", "lru", "lookahead", "lookahead+drop", "lookahead+buddy",
                                          "lookahead+lowrank"}  # fmt: skip
    resident, lru = runs[("resident", 1.0)], runs[("lru", 0.25)]
    # lossless configs decode the same text to the same bits per byte; without prefetch every copy is a miss
    for name in ("patched-1.0", "naive", "lru", "lookahead"):
        r = next(r for (n, _), r in runs.items() if n == name)
        assert r["bits_per_byte"] == pytest.approx(resident["bits_per_byte"], abs=1e-6)
    assert lru["bytes_per_token"] == pytest.approx(lru["misses_per_token"] * result["expert_bytes"])
    assert all(r["peak_device_bytes"] <= r["budget"] * 64 * result["expert_bytes"] + 1 for r in result["runs"])
    for png in ("offload-speed-vs-budget.png", "offload-bits-vs-speed.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_fairness_cli_writes_table_plots_and_json(tmp_path, capsys):
    from fairness.cli import main

    main(["--workload", "overload", "--duration", "30", "--policies", "fcfs,vtc", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "fcfs" in out and "vtc" in out and "max svc diff" in out
    summary = json.loads((tmp_path / "fairness-overload.json").read_text())
    assert set(summary) == {"fcfs", "vtc"} and "jain" in summary["vtc"]["metrics"]
    assert (tmp_path / "fairness-overload-service.png").exists()
    assert (tmp_path / "fairness-overload-ttft-cdf.png").exists()


def test_fairness_cli_rejects_unknown_policy(tmp_path):
    from fairness.cli import main

    with pytest.raises(SystemExit, match="unknown policies"):
        main(["--policies", "fcfs,lottery", "--out", str(tmp_path)])


def test_fairness_bench_trains_exports_and_compares_equinox(tmp_path):
    from fairness.bench import run_fairness_bench

    summary = run_fairness_bench(tmp_path, quick=True)
    saved = json.loads((tmp_path / "fairness.json").read_text())
    assert saved["simulated"] is True
    models = saved["predictors"]["models"]
    for label in ("single regressor", "MoPE, 3 experts"):
        assert models[label]["onnx_max_abs_diff"] <= 1e-5
        assert len(models[label]["runs"]) == 3 and all(Path(r["onnx"]).exists() for r in models[label]["runs"])
    assert saved["predictors"]["rows_train"] > 0 and saved["predictors"]["rows_test"] > 0
    for name, rows in summary["workloads"].items():
        assert {"vtc", "equinox", "equinox-static"} <= set(rows), name
        for policy in ("vtc", "equinox"):
            m = rows[policy]["metrics"]
            assert m["decision_us"] > 0 and m["finished"] > 0
            assert 0 < m["compute_utilization"] <= m["utilization"] <= 1.0 + 1e-9


def test_fairness_cli_refuses_a_missing_mope_file(tmp_path):
    from fairness.cli import main

    with pytest.raises(SystemExit, match="no such file"):
        main(["--policies", "equinox", "--mope", str(tmp_path / "missing.onnx"), "--out", str(tmp_path)])
