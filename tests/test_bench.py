"""The benchmarks' code paths on tiny settings: complete JSON, numbers consistent with stats(), no timing asserted."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench


def test_offload_bench_json_is_complete_and_consistent(tmp_path, reference_dir):
    from lab.offload_bench import main

    # the rows checked below; the quick mode's other rows run in make bench
    rows = ("resident", "patched-1.0", "default", "lru", "lookahead", "auto", "auto+lookahead", "static-frequency",
            "lru+buddy", "auto+mixed")  # fmt: skip

    # eager rows only: their compiled twins are most of the run, and test_compile covers compile=True
    main(["--mode", "quick", "--model", str(reference_dir), "--out", str(tmp_path), "--prompts", "1",
          "--prompt-len", "16", "--eval-bytes", "200", "--quality-bytes", "1000", "--link-gbps", "50",
          "--eager-only", "--calibration-bytes", "12000", "--resident-repeats", "1",
          "--rows", ",".join(rows)])  # fmt: skip
    result = json.loads((tmp_path / "offload.json").read_text())
    (model,) = result["models"]
    assert model["model"] == "custom" and model["experts"] == 8 and model["dtype"] == "bfloat16"
    assert model["link"] == {**model["link"], "emulated": True, "gbps": 50}
    fields = {"name", "budget", "decode_tokens_per_s", "prefill_tokens_per_s", "hit_rate", "misses_per_token",
              "bytes_per_token", "bits_per_byte", "substituted_per_token", "device_expert_bytes"}  # fmt: skip
    runs = {(r["name"], r["budget"]): r for r in model["runs"]}
    assert all(fields <= set(r) for r in model["runs"])
    assert {name for name, _ in runs} == set(rows)
    resident, lru = runs[("resident", 1.0)], runs[("lru", 0.25)]
    for name in ("patched-1.0", "lru", "lookahead"):  # lossless, and on the device's own kernel: the same bits/byte
        r = next(r for (n, _), r in runs.items() if n == name)
        assert r["bits_per_byte"] == pytest.approx(resident["bits_per_byte"], abs=1e-6)
        assert r["substituted_per_token"] == 0
    assert runs[("lru+buddy", 0.25)]["substituted_per_token"] > 0  # lossy: some pairs served by a buddy
    assert runs[("static-frequency", 0.25)]["bytes_per_token"] == 0  # a static placement never copies
    assert model["hit_rate_vs_budget"][0]["hit_rate"] <= model["hit_rate_vs_budget"][-1]["hit_rate"]
    for h in model["hit_rate_vs_budget"]:  # no eviction policy beats the offline optimum (both warm-started)
        assert h["hit_rate"] <= h["optimal_hit_rate"] + 1e-9 <= h["optimal_bypass_hit_rate"] + 2e-9
    assert sorted(model["lookahead_recall"]) == ["1", "2", "3"]  # depths, as JSON keys
    assert lru["bytes_per_token"] == pytest.approx(lru["misses_per_token"] * model["expert_bytes"])  # no prefetch
    total = model["layers"] * model["experts"] * model["expert_bytes"]
    assert all(r["device_expert_bytes"] <= r["budget"] * total + 1 for r in model["runs"])
    quality = model["standin_quality"]
    assert {"resident", "quant2", "quant4", "quant8", "buddy"} <= set(quality)
    assert any(k.startswith("lowrank") for k in quality)
    assert quality["quant8"]["bits_per_byte"] < quality["quant2"]["bits_per_byte"]  # more bits, closer to exact
    for png in ("offload-custom-speed-vs-budget.png", "offload-custom-bits-vs-speed.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    from lab.offload_report import mechanism_goals

    goals = mechanism_goals(model)  # issue 21's goals, from the rows of this run
    speed = {name: r["decode_tokens_per_s"] for (name, _), r in runs.items()}
    assert goals["auto+lookahead x auto @0.25"] == pytest.approx(
        (speed["auto+lookahead"] / speed["auto"], 1.15, speed["auto+lookahead"] / speed["auto"] >= 1.15))  # fmt: skip
    (default,) = [v for k, v in goals.items() if k.startswith("default x fastest lossless row")]
    assert default[0] <= 1.0 and default[2] == (default[0] >= 0.95)
    assert any(k.startswith("best buddy row") for k in goals)


def test_bench_options_out_of_range_are_refused_before_any_work(tmp_path, capsys):
    from lab.fit_bench import main as fit_bench
    from lab.offload_bench import main as offload_bench

    with pytest.raises(SystemExit):
        offload_bench(["--resident-repeats", "0", "--out", str(tmp_path)])
    assert "--resident-repeats must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit_bench(["--calibration-bytes", "0", "--out", str(tmp_path)])
    assert "--calibration-bytes must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit_bench(["--rounds", "0", "--out", str(tmp_path)])
    assert "--rounds must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_scale_bench_json_is_complete_and_its_replay_examines_one_key_per_eviction(tmp_path):
    from lab.results_doc import main as results_doc
    from lab.scale_bench import GOALS, main

    main(["--mode", "tiny", "--shapes", "mixtral-8x7b", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "scale.json").read_text())
    (shape,) = result["shapes"]
    assert (shape["moe_layers"], shape["experts"], shape["top_k"]) == (32, 8, 2)
    rows = {(r["name"], r["budget"]): r for r in shape["rows"]}
    assert set(GOALS) <= set(rows)
    for r in shape["rows"]:
        assert r["greedy_identical"] and r["x_resident"] > 0 and 0 <= r["hit_rate"] <= 1
    assert rows[("patched-1.0", 1.0)]["misses_per_token"] == 0
    assert any(r["emulated"] for r in shape["rows"])
    assert shape["routing"] == "spread"
    for routing in ("default", "spread"):
        replay = [r for r in result["replay"] if r["routing"] == routing]
        assert [r["slots"] for r in replay] == sorted(r["slots"] for r in replay) and replay[-1]["slots"] > 14_000
        assert all(r["evictions"] > 0 and r["victim_steps_per_eviction"] <= 2 for r in replay)
    spread, default = (min(r["hit_rate"] for r in result["replay"] if r["routing"] == k) for k in ("spread", "default"))
    assert spread < default  # spread routing misses more: what it is there for
    results_doc([str(tmp_path), str(tmp_path / "results.md")])
    assert "routing scale of real models" in (tmp_path / "results.md").read_text()


def test_miss_path_bench_runs_every_path_at_each_link_speed_and_keeps_the_tokens(tmp_path):
    from lab.miss_path_bench import ROWS, main
    from lab.results_doc import main as results_doc

    main(["--mode", "tiny", "--shape", "mixtral-8x7b", "--ratios", "0.5,4", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "miss_path.json").read_text())
    assert result["link"] == "EMULATED" and result["host_seconds_per_expert"] > 0
    assert [p["copy_over_host"] for p in result["points"]] == [0.5, 4.0]
    for p in result["points"]:
        rows = {r["name"]: r for r in p["rows"]}
        assert list(rows) == list(ROWS) and all(r["greedy_identical"] for r in rows.values())
        assert max(rows["host"]["x_best_of_host_and_fetch"], rows["fetch"]["x_best_of_host_and_fetch"]) == 1.0
        assert rows["fetch"]["host_per_token"] == 0 and rows["host"]["host_per_token"] > 0
        assert rows["freetoken"]["miss_path"] == "freetoken-split" and rows["auto"]["miss_path"] == "auto"
    slow, fast = result["points"][1]["emulated_link_gbps"], result["points"][0]["emulated_link_gbps"]
    assert fast == pytest.approx(8 * slow)
    results_doc([str(tmp_path), str(tmp_path / "results.md")])
    assert "Which miss path wins at which link speed" in (tmp_path / "results.md").read_text()


def test_fit_bench_sets_the_plans_estimates_beside_the_measured_decode(tmp_path):
    from lab.fit_bench import main
    from lab.results_doc import main as results_doc

    main(["--budgets", "0.5", "--tokens", "3", "--rounds", "1", "--calibration-bytes", "6000", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "fit.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["mixtral", "fine"]
    for r in rows:
        assert r["measured_tokens_per_s"] > 0 and r["fit_checkpoint_tokens_per_s"] > 0
        assert r["fit_checkpoint_over_measured"] == pytest.approx(
            r["fit_checkpoint_tokens_per_s"] / r["measured_tokens_per_s"])  # fmt: skip
        patched = r["measured_patched_tokens_per_s"]  # each plan against the run it plans
        assert r["fit_in_memory_over_measured"] == pytest.approx(r["fit_in_memory_tokens_per_s"] / patched)
        assert r["hit_rate_source"] == "calibration trace"
        assert 0.5 <= r["expected_hit_rate"] <= 1 and 0 < r["measured_hit_rate"] <= 1  # calibrated: >= uniform
    results_doc([str(tmp_path), str(tmp_path / "results.md")])
    assert "The plan's estimate against the measured decode" in (tmp_path / "results.md").read_text()


def test_host_bench_sets_each_path_beside_the_memory_probe(tmp_path):
    from lab.host_bench import TOKENS, main
    from lab.results_doc import main as results_doc

    main(["--mode", "tiny", "--sizes", "qwen3-30b-a3b", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "host.json").read_text())
    assert result["memory_gbps"] > 0
    (size,) = result["sizes"]
    assert size["expert_bytes"] == 3 * 2048 * 768 * 2
    paths = {r["path"].split(" (")[0] for r in size["rows"]}
    assert paths == {"host", "host int8", "host int4", "three F.linear", "stock kernel on a one-expert twin"}
    assert all(r["gbps"] > 0 for r in size["rows"]) and {r["tokens"] for r in size["rows"]} == set(TOKENS)
    results_doc([str(tmp_path), str(tmp_path / "results.md")])
    assert "Host compute against the memory's speed" in (tmp_path / "results.md").read_text()


def test_packed_bench_copies_packed_bytes_and_matches_bf16_step_for_step(tmp_path):
    from lab.packed_bench import main
    from lab.results_doc import main as results_doc

    main(["--mode", "tiny", "--cases", "mixtral-8x7b:int4", "--out", str(tmp_path)])
    (case,) = json.loads((tmp_path / "packed.json").read_text())["cases"]
    assert case["format"] == "int4" and case["link"]["emulated"]
    for r in case["rows"]:
        assert r["greedy_identical"] and r["misses_per_token"] > 0
        assert r["bytes_per_copy"] == case["expert_bytes"]  # a copy moves exactly the packed expert
        assert abs(r["copy_bytes_x_bf16"] - case["expert_bytes_x_bf16"]) < 1e-9 and r["copy_bytes_x_bf16"] < 0.3
    results_doc([str(tmp_path), str(tmp_path / "results.md")])
    assert "Low-bit checkpoints" in (tmp_path / "results.md").read_text()


def test_fairness_cli_writes_table_plots_and_json(tmp_path, capsys):
    from lab.simulate import main

    main(["--workload", "overload", "--duration", "30", "--policies", "fcfs,vtc", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "fcfs" in out and "vtc" in out and "max svc diff" in out
    summary = json.loads((tmp_path / "fairness-overload.json").read_text())
    assert set(summary) == {"fcfs", "vtc"} and "jain" in summary["vtc"]["metrics"]
    assert (tmp_path / "fairness-overload-service.png").exists()
    assert (tmp_path / "fairness-overload-ttft-cdf.png").exists()


def test_fairness_cli_rejects_unknown_policy(tmp_path):
    from lab.simulate import main

    with pytest.raises(SystemExit, match="unknown policies"):
        main(["--policies", "fcfs,lottery", "--out", str(tmp_path)])


def test_fairness_bench_trains_exports_and_compares_equinox(tmp_path):
    from lab.fairness_bench import run_fairness_bench

    summary = run_fairness_bench(tmp_path, "quick")
    saved = json.loads((tmp_path / "fairness.json").read_text())
    assert saved["simulated"] is True
    models = saved["predictors"]["models"]
    for label in ("single regressor", "MoPE, 3 experts"):
        assert models[label]["onnx_max_abs_diff"] <= 1e-5
        runs = models[label]["runs"]
        assert len(runs) == len(saved["predictors"]["seeds"]) and all(Path(r["onnx"]).exists() for r in runs)
    assert saved["predictors"]["rows_train"] > 0 and saved["predictors"]["rows_test"] > 0
    for name, rows in summary["workloads"].items():
        assert {"vtc", "equinox", "equinox-static"} <= set(rows), name
        for policy in ("vtc", "equinox"):
            m = rows[policy]["metrics"]
            assert m["decision_us"] > 0 and m["finished"] > 0
            assert 0 < m["compute_utilization"] <= m["utilization"] <= 1.0 + 1e-9
    paper = saved["vtc_paper"]["workloads"]["overload"]  # the VTC paper's workload, beside the artifact's runs
    assert {"fcfs", "lcf", "vtc", "vtc-pred", "equinox"} <= set(paper)
    assert paper["vtc"]["paper"]["throughput_in_out_tok_s"] > 0 and paper["equinox"]["paper"] is None
    assert paper["vtc"]["sim"]["acc_service_diff"] < paper["fcfs"]["sim"]["acc_service_diff"]
    assert 0 < paper["vtc"]["ratio_to_2U"] <= 1 < paper["fcfs"]["ratio_to_2U"]


def test_fairness_cli_refuses_a_missing_mope_file(tmp_path):
    from lab.simulate import main

    with pytest.raises(SystemExit, match="no such file"):
        main(["--policies", "equinox", "--mope", str(tmp_path / "missing.onnx"), "--out", str(tmp_path)])


def test_fairness_cli_runs_a_vtc_paper_workload_on_the_slora_preset(tmp_path, capsys):
    from lab.simulate import main

    main(["--vtc-paper", "increase", "--policies", "fcfs,lcf", "--until", "60", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "vtc-paper-increase: 960 requests, 2 clients, engine a10g-llama2-7b-slora" in out
    summary = json.loads((tmp_path / "fairness-vtc-paper-increase.json").read_text())
    assert summary["lcf"]["metrics"]["preemptions"] == 0  # the S-LoRA engine never preempts


def test_unknown_bench_modes_are_refused(tmp_path):
    from lab.fairness_bench import run_fairness_bench
    from lab.served_bench import run_served_bench

    with pytest.raises(ValueError, match="unknown fairness bench mode 'fulll'"):
        run_fairness_bench(tmp_path, "fulll")
    with pytest.raises(ValueError, match="unknown served bench mode 'fast'"):
        run_served_bench(tmp_path, tmp_path, "fast")
    from lab.gateway_bench import run_gateway_bench

    with pytest.raises(ValueError, match="unknown gateway bench mode 'full'"):
        run_gateway_bench(tmp_path, tmp_path, "full")


def test_the_cluster_bench_writes_its_table_and_json(tmp_path, capsys):
    from lab.cluster_bench import run_cluster_bench
    from lab.results_doc import main as results_doc

    summary = run_cluster_bench(tmp_path, seconds=4.0)
    assert set(summary["modes"]) == {"global", "round-robin", "least-loaded"}
    assert json.loads((tmp_path / "cluster.json").read_text())["tenants"] == 10_000
    assert "cluster (SIMULATED): 64 replicas" in capsys.readouterr().out
    results_doc([str(tmp_path), str(tmp_path / "results.md")])
    assert "## A cluster, SIMULATED" in (tmp_path / "results.md").read_text()


@pytest.mark.bench
def test_disk_read_paths_read_the_same_bytes_and_release_the_cache_as_they_say(tmp_path):
    from lab.disk_read import main as disk_read

    disk_read(["--gib", "0.03", "--chunk-mib", "1", "--dir", str(tmp_path), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "disk-read.json").read_text())  # measure() raises if the paths' bytes differ
    runs = result["runs"]
    assert all(r["cached_before"] == 0 for name, r in runs.items() if name != "page-cache")  # each from a cold file
    assert runs["o_direct"]["cached_after"] == 0 and runs["pread+dontneed"]["cached_after"] == 0
    assert runs["mmap-copy"]["cached_after"] > 0.9 and runs["page-cache"]["cached_after"] == 1
    assert result["disk_read_gbps"] == max(runs["o_direct"]["gbps"], runs["pread+dontneed"]["gbps"])
    assert not list(tmp_path.glob("*/disk-read.bin"))  # the file is removed


@pytest.mark.bench
def test_disk_bench_runs_every_configuration_under_a_memory_limit(tmp_path):
    """The disk bench on a 50 MB checkpoint: every configuration runs in its own process, the lossless ones decode
    accelerate's greedy tokens, and the checkpoint is removed afterwards."""
    from lab.disk_bench import main as disk_bench

    configs = "lru,default,page-cache,accelerate-disk"
    disk_bench(["--geometry", "small", "--gib", "0.05", "--budgets", "0.25", "--tokens", "3", "--prompt", "8",
                "--configs", configs, "--dir", str(tmp_path), "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "disk.json").read_text())
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"lru", "default", "page-cache", "accelerate-disk"}
    assert all("error" not in r for r in runs.values()), [r.get("error") for r in runs.values()]
    assert runs["lru"]["tokens"] == runs["default"]["tokens"] == runs["accelerate-disk"]["tokens"]
    assert runs["lru"]["tokens_equal_accelerate"] and runs["lru"]["x_accelerate-disk"] > 0
    assert 0 <= runs["lru"]["hit_rate"] <= 1 and runs["accelerate-disk"]["hit_rate"] is None
    assert all(r["memory_limit_bytes"] > 0 and len(r["tokens"]) == 4 for r in runs.values())
    if result["memory_limit"] == "cgroup":
        assert all(0 < r["peak_memory_bytes"] <= r["memory_limit_bytes"] for r in runs.values())
    assert (tmp_path / "disk-speed.png").exists() and not list(tmp_path.glob("offload-moe-disk-bench-*/*"))


def test_disk_bench_refuses_an_unknown_configuration(tmp_path):
    from lab.disk_bench import main as disk_bench

    with pytest.raises(SystemExit, match=r"unknown configurations \['fast'\]; choose from lru, lookahead"):
        disk_bench(["--configs", "lru,fast", "--dir", str(tmp_path), "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_routing_ceilings_on_a_hand_worked_trace():
    """Two slots, one layer, experts needed 1 2 3 1 2 4 1 2 (worked by hand): Belady misses 3, 2 (after evicting it
    for 3), 4 and 2 again; with bypass, 3 and 4 are computed where they are and never admitted."""
    from lab.routing_stats import optimal_hit_rate, static_hit_rate

    trace = [(0, [e]) for e in (1, 2, 3, 1, 2, 4, 1, 2)]
    assert optimal_hit_rate(trace, 2) == 4 / 8
    assert optimal_hit_rate(trace, 2, bypass=True) == 6 / 8
    assert static_hit_rate(trace, 2) == 6 / 8  # experts 1 and 2, used three times each
    assert optimal_hit_rate(trace, 4) == 1.0  # everything fits: the free warm start holds it all
    assert optimal_hit_rate([(0, [1, 2]), (0, [3, 1])], 2) == 3 / 4  # a call's own experts are never evicted for it
