"""`offload_moe.fit`: the plan it prints is the one `load` and `patch` then make, from the checkpoint's headers alone;
its command line; its errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import offload_moe
import offload_moe.fit_plan as fit_plan
import offload_moe.sizing as sizing
from offload_moe import UnsupportedModelError
from offload_moe.calibration import load_calibration
from tests.helpers import REFERENCE_MODEL_DIR, REPO, load_reference, tiny_dense_model, tiny_model


@pytest.mark.parametrize("budget", [0.25, 0.5, "1MiB"])
def test_fit_of_a_checkpoint_is_the_plan_load_makes(budget, loaded):
    plan = offload_moe.fit(REFERENCE_MODEL_DIR, budget, "cpu")
    _, handle = loaded(REFERENCE_MODEL_DIR, budget=budget, device="cpu")
    s = handle.stats()
    assert plan.device_experts == s.slots and plan.expert_bytes == s.expert_bytes
    assert plan.disk_experts == plan.layers * plan.experts - s.slots and plan.ram_experts == 0
    assert plan.hit_rate_source == "uniform" and plan.hit_rate == pytest.approx(s.slots / plan.layers / plan.experts)
    assert plan.misses_per_token == pytest.approx(plan.layers * plan.top_k * (1 - plan.hit_rate))
    assert plan.missing_calls_per_token == pytest.approx(plan.layers * (1 - plan.hit_rate**plan.top_k))
    assert plan.decode_tokens_per_s > 0 and set(plan.probes) == {"copy", "host", "disk", "runtime call"}
    assert plan.step_source == "skeleton" and plan.call_seconds == plan.probes["runtime call"]
    assert plan.miss_seconds == pytest.approx(plan.probes["copy"] + plan.probes["disk"])  # fetch: each from disk
    text = str(plan)
    assert f"{s.slots} of {plan.layers * plan.experts} experts" in text and "tokens/s decode" in text


def test_fit_of_a_model_in_memory_is_the_plan_patch_makes(patched, monkeypatch):
    model = tiny_model("mixtral")
    monkeypatch.setattr(sizing, "free_device_bytes", lambda device: (1 << 30) + 200_000)  # "auto": a few experts
    plan = offload_moe.fit(model, device="cpu", max_tokens=16)
    handle = patched(model, device="cpu", max_tokens=16)
    s = handle.stats()
    assert plan.room is not None and plan.device_experts == s.slots < plan.layers * plan.experts
    assert plan.room.experts == s.budget_bytes and plan.step_source == "measured"
    assert plan.ram_experts == plan.layers * plan.experts and plan.disk_experts == 0
    assert "budget auto:" in str(plan) and "GiB margin" in str(plan)


def test_fit_estimates_from_bandwidth_where_no_skeleton_can_be_built(monkeypatch):
    """A family whose config fit cannot cut to a skeleton: the step from active bytes, the miss from the probes."""

    def refuse(*args):
        raise ValueError("unknown family")

    monkeypatch.setattr(fit_plan, "_skeleton", refuse)
    plan = offload_moe.fit(REFERENCE_MODEL_DIR, 0.25, "cpu")
    assert plan.step_source == "bandwidth" and "runtime call" not in plan.probes and plan.call_seconds == 0.0
    assert plan.decode_tokens_per_s > 0
    assert plan.miss_seconds == pytest.approx(plan.probes["copy"] + plan.probes["disk"])  # fetch: every miss from disk


def test_fit_reads_the_hit_rate_from_a_calibration(tmp_path):
    model, tokenizer = load_reference(REFERENCE_MODEL_DIR)
    path = tmp_path / "calib.safetensors"
    offload_moe.calibrate(model, ["The quick brown fox jumps over the lazy dog. " * 20], tokenizer, path=path)
    uniform = offload_moe.fit(REFERENCE_MODEL_DIR, 0.25, "cpu")
    traced = offload_moe.fit(REFERENCE_MODEL_DIR, 0.25, "cpu", calibration=path)
    assert traced.hit_rate_source == "calibration trace" and traced.hit_rate >= uniform.hit_rate
    calib = load_calibration(path)  # a file written before calibrations kept the routing trace: the frequencies
    dataclasses.replace(calib, routing=None).save(path)
    frequent = offload_moe.fit(REFERENCE_MODEL_DIR, 0.25, "cpu", calibration=path)
    assert frequent.hit_rate_source == "calibration" and frequent.hit_rate >= uniform.hit_rate


def test_fit_command_line_prints_the_plan_and_its_json(capsys):
    """`python -m offload_moe fit` in a process of its own once (the JSON); the table and a refusal through its main."""
    out = subprocess.run(
        [sys.executable, "-m", "offload_moe", "fit", str(REFERENCE_MODEL_DIR), "--device", "cpu", "--budget", "0.25",
         "--json"], capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["device_experts"] == 16 and doc["disk_experts"] == 48 and doc["decode_tokens_per_s"] > 0
    fit_plan.main([str(REFERENCE_MODEL_DIR), "--device", "cpu", "--budget", "0.25"])
    text = capsys.readouterr().out
    assert "16 of 64 experts" in text and "tokens/s decode" in text
    with pytest.raises(SystemExit):  # argparse's usage error: the message, no traceback
        fit_plan.main([str(REFERENCE_MODEL_DIR), "--device", "cpu", "--budget", "lots"])
    err = capsys.readouterr().err
    assert "budget='lots' is not a size" in err and "Traceback" not in err


def test_fit_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
        offload_moe.fit(tmp_path / "nowhere", 0.5, "cpu")
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        offload_moe.fit(tiny_dense_model(), 0.5, "cpu")
    with pytest.raises(offload_moe.BudgetError, match="raise the budget"):
        offload_moe.fit(tiny_model("mixtral"), "1KiB", "cpu")
