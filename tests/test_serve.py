"""fairness.serve over real HTTP on loopback, with the official openai client: answers, errors, tenants, metrics,
cancellation, shutdown, and fairness on the real engine."""

import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fairness import Request
from fairness.core.driver import OracleUnavailableError
from fairness.measure.records import record_metrics
from fairness.serve import BackgroundServer, build_engine
from fairness.serve import main as serve_main
from fairness.serving.api import load_tenants
from fairness.serving.compat import is_registered
from fairness.serving.server import create_app
from lab.loadgen import replay
from lab.served_bench import OUTPUT, PROMPT, measure_capacity

pytestmark = [pytest.mark.served, pytest.mark.bench]  # the lab's load generator and served bench

MODEL = "reference-moe"


@pytest.fixture(scope="module")
def server(reference_dir):
    engine = build_engine(reference_dir, "vtc", device="cpu", offload_budget=0.5, max_running=4,
                          offload_options={"miss_path": "host", "prefetch": None})  # fmt: skip
    srv = BackgroundServer(create_app(engine, max_tokens_limit=64))
    url = srv.start()
    yield url, engine
    srv.stop()


def _client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_streamed_chat_and_plain_completion_through_the_openai_client(server):
    url, engine = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def f(x):"}],
                                                 max_tokens=12, stream=True, user="alice"))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")
    done = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=10, user="bob")
    assert done.usage.prompt_tokens == len(engine.encode_prompt("import os\n"))
    assert 1 <= done.usage.completion_tokens <= 10 and done.choices[0].finish_reason in ("stop", "length")
    exact = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=9, extra_body={"ignore_eos": True})
    assert exact.usage.completion_tokens == 9 and exact.choices[0].finish_reason == "length"
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def f(x):"}],
                                           max_tokens=12, user="alice")  # fmt: skip
    assert text == whole.choices[0].message.content  # greedy: streamed pieces add up to the whole answer
    stats = engine.offload.stats()
    assert stats.host_experts > 0  # the model really ran offloaded, misses computed on the host


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps({"model": MODEL}).encode(), 400, "missing_prompt"),
        (json.dumps({"model": MODEL, "prompt": "x" * 6000, "max_tokens": 8}).encode(), 400, "context_length_exceeded"),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 0}).encode(), 400, "invalid_value"),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 65}).encode(), 400, "invalid_value"),
        (json.dumps({"model": MODEL, "prompt": "hi", "temperature": 0.7}).encode(), 400, "unsupported_parameter"),
        (json.dumps({"model": MODEL, "prompt": [1, 99999]}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "gpt-5", "prompt": "hi"}).encode(), 404, "model_not_found"),
        (b'{"prompt": "' + b"a" * (2 << 20) + b'"}', 413, "body_too_large"),
    ],
)
def test_bad_completions_get_openai_errors_and_the_server_keeps_serving(server, body, status, code):
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_bad_chat_messages(server):
    url, _ = server
    for messages in (None, [], [{"role": "user"}], ["hi"]):
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "missing_messages"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        _client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y " * 2000}])


def test_metrics_parse_as_prometheus_text(server):
    url, _ = server
    _client(url).completions.create(model=MODEL, prompt="x = 1\n", max_tokens=4, user="carol")
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    for name in ("fairness_client_service", "fairness_requests_queued", "fairness_requests_running",
                 "fairness_ttft_seconds", "fairness_inter_token_seconds", "fairness_tokens_per_second",
                 "offload_moe:expert_hit_rate", "offload_moe:expert_hits", "offload_moe:expert_misses",
                 "offload_moe:bytes_copied", "offload_moe:host_experts", "offload_moe:stall_seconds",
                 "offload_moe:layer_expert_hits"):  # fmt: skip
        assert name in families, name
    counted = {s.name: s for s in families["offload_moe:expert_misses"].samples}
    assert counted["offload_moe:expert_misses_total"].labels == {"model_name": MODEL}
    per_layer = families["offload_moe:layer_expert_misses"].samples
    assert sum(s.value for s in per_layer) == counted["offload_moe:expert_misses_total"].value > 0
    carol = [s.value for s in families["fairness_client_service"].samples if s.labels.get("client") == "carol"]
    assert carol and carol[0] > 0


def test_a_client_that_leaves_mid_stream_is_cancelled_and_its_cache_freed(server):
    url, engine = server
    body = {"model": MODEL, "prompt": [3] * 20, "max_tokens": 64, "stream": True, "ignore_eos": True, "user": "dave"}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # the server notices the disconnect at its next write; the engine then drops the request and its KV blocks
    scheduler = engine.manager.batch_processor.scheduler
    for _ in range(200):
        if not scheduler.active_requests and not scheduler.waiting_requests:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not scheduler.active_requests and not scheduler.waiting_requests
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    outcomes = {s.labels["outcome"] for s in families["fairness_requests"].samples if s.labels.get("client") == "dave"}
    assert "cancelled" in outcomes
    gauges = {f.name: f.samples[0].value for f in families.values() if f.name.startswith("fairness_requests_")}
    assert gauges["fairness_requests_running"] == 0 and gauges["fairness_requests_queued"] == 0  # not stuck at 1
    assert _client(url).completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_tenants_require_a_known_key_and_are_charged_by_key(reference_dir, tmp_path):
    keys = tmp_path / "tenants.json"
    keys.write_text(json.dumps({"sk-alpha": {"name": "alpha", "weight": 2.0}, "sk-beta": {"name": "beta"}}))
    engine = build_engine(reference_dir, "fcfs", device="cpu", max_running=2)
    srv = BackgroundServer(create_app(engine, load_tenants(str(keys)), max_tokens_limit=16))
    url = srv.start()
    try:
        with pytest.raises(openai.AuthenticationError):
            _client(url, "sk-wrong").completions.create(model=MODEL, prompt="a", max_tokens=2)
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        _client(url, "sk-alpha").completions.create(model=MODEL, prompt="abc", max_tokens=3, user="mallory")
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
        charged = {s.labels["client"] for s in families["fairness_client_service"].samples if "client" in s.labels}
        assert charged == {"alpha"}  # the key decides, not the user field
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="not a tenants file"):
        load_tenants(str(tmp_path / "missing.json"))


def test_shutdown_drains_what_is_in_flight(reference_dir):
    engine = build_engine(reference_dir, "vtc", device="cpu", max_running=2)
    srv = BackgroundServer(create_app(engine, max_tokens_limit=32))
    url = srv.start()

    async def ask():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            return await client.completions.create(model=MODEL, prompt=[4] * 8, max_tokens=24,
                                                   extra_body={"ignore_eos": True})  # fmt: skip

    async def run():
        task = asyncio.create_task(ask())
        await asyncio.sleep(0.3)  # in flight
        await asyncio.to_thread(srv.stop)
        return await task

    scheduler_type = engine.scheduler_type
    assert is_registered(scheduler_type)
    result = asyncio.run(run())
    assert result.usage.completion_tokens == 24  # drained, not cut
    assert not srv.thread.is_alive() and not engine.manager.is_running()
    assert not is_registered(scheduler_type)  # transformers' scheduler table holds no entry per stopped engine


def test_an_oracle_policy_is_refused_before_serving(reference_dir):
    with pytest.raises(OracleUnavailableError, match="only a simulation knows"):
        build_engine(reference_dir, "vtc-oracle", device="cpu")
    with pytest.raises(SystemExit, match="only a simulation knows"):
        serve_main([str(reference_dir), "--policy", "vtc-oracle", "--device", "cpu"])


ARRIVALS_S = 7  # seconds of arrivals: at twice the capacity, FCFS's backlog grows for 3.5 s of service


@pytest.mark.timed
def test_vtc_keeps_a_light_client_from_starving_on_the_real_engine(reference_dir):
    """A heavy client at twice this engine's measured capacity (it varies with the machine and what else runs), two
    light ones at an eighth of its rate each, well under their fair share: FCFS lets the backlogged gap grow and makes
    the light clients wait behind the heavy one; VTC keeps the gap small and the light clients' first tokens prompt."""
    rate = 2.0 * measure_capacity(reference_dir, None, max_running=6, waves=2) / OUTPUT  # heavy req/s
    requests = [Request("heavy", i / rate, PROMPT, OUTPUT) for i in range(int(ARRIVALS_S * rate))]
    requests += [Request(c, 0.1 + k * 0.05 + 8 * i / rate, PROMPT, OUTPUT) for k, c in enumerate(("light-a", "light-b"))
                 for i in range(int(ARRIVALS_S * rate / 8))]  # fmt: skip
    measured = {}
    for policy in ("fcfs", "vtc"):
        engine = build_engine(reference_dir, policy, device="cpu", max_running=6)
        srv = BackgroundServer(create_app(engine, max_tokens_limit=64))
        url = srv.start()
        try:
            records = asyncio.run(replay(url, MODEL, requests, timeout_s=180))
        finally:
            srv.stop()
        measured[policy] = record_metrics(records)
        assert measured[policy].metrics["finished"] == len(requests)
    fcfs, vtc = measured["fcfs"], measured["vtc"]
    assert vtc.metrics["max_service_diff"] < 0.5 * fcfs.metrics["max_service_diff"]
    for light in ("light-a", "light-b"):
        assert vtc.per_client[light]["ttft_p50_s"] < 0.5 * fcfs.per_client[light]["ttft_p50_s"]
