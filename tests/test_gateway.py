"""fairness.gateway: its limit learner and admission (no HTTP), then over real HTTP on loopback with the official
OpenAI client: in front of fake engines of known speed, `fairness.serve` replicas (unpatched and offloaded) and
`transformers serve --continuous-batching`; faults (client disconnects, an upstream killed and restarted)."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fairness.gateway import ConcurrencyLimit, GatewayConfig, create_gateway
from fairness.gateway.admission import Admission
from fairness.gateway.upstreams import UpstreamDown, UpstreamPool
from fairness.serve import BackgroundServer
from tests.fake_engine import MODEL, create_fake_engine
from tests.servers import free_port, spawn

# --- no HTTP ------------------------------------------------------------------------------------------------------


def _saturated_windows(limit: ConcurrencyLimit, rate_at, windows: int, t: float = 0.0) -> float:
    """`windows` saturated one-second windows, the engine streaming rate_at(limit) tokens/s."""
    for _ in range(windows):
        for k in range(11):  # tokens every 0.1 s: the window closes at 1.0 s
            limit.tokens(round(rate_at(limit.value) / 10), t + k * 0.1, saturated=True)
        t += 1.1
    return t


def test_a_learned_limit_grows_while_throughput_rises_and_stops_where_it_stops():
    """An engine that batches everything: its rate rises with the work it is given up to 8 requests, then stays
    flat (and every request still starts at once, so TTFT says nothing)."""
    limit = ConcurrencyLimit(initial=2, hold=3, window_tokens=1)
    t = _saturated_windows(limit, lambda n: 100 * min(n, 8), 30)
    assert 8 <= limit.value <= 10  # grew to the knee; probes past it went back
    kept = limit.value
    for _ in range(40):
        limit.tokens(100, t, saturated=False)  # not saturated: no evidence either way
        t += 0.1
    assert limit.value == kept
    fixed = ConcurrencyLimit(initial=3, fixed=True, window_tokens=1)
    _saturated_windows(fixed, lambda n: 100 * n, 5)
    assert fixed.value == 3
    with pytest.raises(ValueError, match="minimum <= initial"):
        ConcurrencyLimit(initial=0)


def test_a_fleet_shares_vtcs_counters_only_and_needs_a_store_url():
    from fairness.gateway.fleet import FleetAdmission
    from fairness.gateway.store import SharedState

    with pytest.raises(ValueError, match="--policy vtc"):
        FleetAdmission(SharedState("redis://127.0.0.1:1"), "fcfs", _pool(1, 1))
    with pytest.raises(ValueError, match="redis://HOST:PORT"):
        SharedState("http://127.0.0.1:6379")


def _pool(n: int, limit: int) -> UpstreamPool:
    pool = UpstreamPool([f"http://127.0.0.1:{9000 + i}" for i in range(n)], limit)
    for u in pool.upstreams:
        u.healthy, u.models = True, frozenset({"m"})
    return pool


def test_admission_follows_the_policy_across_upstreams_and_a_requeued_request_is_not_charged_twice():
    async def run():
        pool = _pool(2, limit=1)
        adm = Admission("vtc", pool)
        heavy = [adm.arrive("heavy", 1.0, 100, 10, "m") for _ in range(4)]
        assert [t.upstream is not None for t in heavy] == [True, True, False, False]
        assert {t.upstream.url for t in heavy[:2]} == {u.url for u in pool.upstreams}  # least loaded: one each
        light = adm.arrive("light", 1.0, 100, 10, "m")
        adm.tokens(heavy[0], 5)
        adm.finish(heavy[0], 5, 100)
        adm.pump()
        assert light.upstream is not None and heavy[2].upstream is None  # VTC: the light tenant goes first
        counter = adm.policy.counter
        before = counter["light"]
        adm.requeue(light)  # its upstream refused it before any token
        assert light.upstream is None and counter["light"] == before
        adm.finish(heavy[1], 0, 100)
        adm.pump()
        assert light.upstream is not None and counter["light"] == before  # re-admitted, not charged again
        adm.tokens(light, 3)
        adm.cancel(light)  # the client left after 3 tokens: charged the prompt and what it received
        assert counter["light"] == pytest.approx(before + 2 * 3)
        assert not adm.running or all(t.upstream for t in adm.running.values())
        await pool.aclose()

    asyncio.run(run())


# --- over HTTP, in front of fake engines ----------------------------------------------------------------------------


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(metrics: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and all((k, x) in ls for k, x in labels.items()))


class Stack:
    """Fake engines and a gateway in front of them, each a uvicorn server in a thread."""

    def __init__(self, engines: int = 2, max_running: int = 2, step_s: float = 0.01, **gateway):
        self.engines = [create_fake_engine(max_running, step_s) for _ in range(engines)]
        self.servers = [BackgroundServer(app) for app in self.engines]
        self.urls = [s.start() for s in self.servers]
        gateway.setdefault("limit", max_running)
        self.app = create_gateway(self.urls, **gateway)
        self.gw = BackgroundServer(self.app)
        self.url = self.gw.start()

    def close(self) -> None:
        self.gw.stop()
        for s in self.servers:
            s.stop()


@pytest.fixture(scope="module")
def stack():
    s = Stack(engines=2, max_running=2, probe_s=0.2, policy="vtc-pred")  # charges a predicted output at admission
    yield s
    s.close()


@pytest.mark.served
def test_completions_and_chat_through_the_gateway_with_the_openai_client(stack):
    client = _client(stack.url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    done = client.completions.create(model=MODEL, prompt="hello there", max_tokens=5, user="bob")
    assert done.choices[0].text == "t0 t1 t2 t3 t4 " and done.usage.completion_tokens == 5
    assert done.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 t2 t3 "
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.usage is None for c in chunks)
    with_usage = list(client.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True,
                                                stream_options={"include_usage": True}))  # fmt: skip
    assert with_usage[-1].usage.completion_tokens == 3
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert whole.choices[0].message.content == "t0 t1 t2 t3 " and whole.usage.total_tokens > 4
    m = _metrics(stack.url)
    assert _sum(m, "fairness_gateway_tokens_total", tenant="bob", kind="completion") == 5
    assert _sum(m, "fairness_gateway_requests_total", outcome="ok") >= 4


@pytest.mark.served
def test_bad_input_is_refused_before_any_upstream_is_touched(stack):
    served = sum(e.state.served for e in stack.engines)
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model_not_found"),
        (json.dumps({"model": MODEL}).encode(), 400, "missing_prompt"),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(), 400, "invalid_value"),
        (json.dumps({"model": MODEL, "prompt": "x", "stream": "yes"}).encode(), 400, "invalid_value"),
        (json.dumps({"model": MODEL, "prompt": [1, "a"]}).encode(), 400, "missing_prompt"),
    ]
    for body, status, code in cases:
        r = httpx.post(stack.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    r = httpx.post(stack.url + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert sum(e.state.served for e in stack.engines) == served
    with pytest.raises(openai.NotFoundError):
        _client(stack.url).completions.create(model="nope", prompt="x", max_tokens=2)


@pytest.mark.served
def test_tenant_xargs_names_each_requests_tenant_to_the_upstream_for_vllms_plugin():
    """--tenant-xargs: the upstream reads the tenant in vllm_xargs (kept beside the client's own xargs); without it
    the body goes on as the client sent it."""
    for flag, expected in (
        (True, [{"tenant": "u1"}, {"seed_hint": 3, "tenant": "u2"}]),
        (False, [None, {"seed_hint": 3}]),
    ):
        s = Stack(engines=1, config=GatewayConfig(tenant_xargs=flag))
        try:
            client = _client(s.url)
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, user="u1")
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, user="u2",
                                      extra_body={"vllm_xargs": {"seed_hint": 3}})  # fmt: skip
            assert s.engines[0].state.xargs == expected, flag
        finally:
            s.close()


@pytest.mark.served
def test_tenants_come_from_api_keys_then_the_fairness_header_then_user(tmp_path):
    keys = tmp_path / "tenants.json"
    keys.write_text(json.dumps({"k-a": {"name": "acme", "weight": 2}}))
    from fairness.serving.api import load_tenants

    s = Stack(engines=1, tenants=load_tenants(str(keys)))
    try:
        with pytest.raises(openai.AuthenticationError):
            _client(s.url, "wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
        _client(s.url, "k-a").completions.create(model=MODEL, prompt="x", max_tokens=2, user="ignored")
        assert _sum(_metrics(s.url), "fairness_gateway_requests_total", tenant="acme", outcome="ok") == 1
    finally:
        s.close()
    s = Stack(engines=1)
    try:
        httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "user": "u1"},
                   headers={"x-gateway-fairness-id": "team-7"})  # fmt: skip
        httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "user": "u1"})
        httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        m = _metrics(s.url)
        assert [_sum(m, "fairness_gateway_requests_total", tenant=t) for t in ("team-7", "u1", "anonymous")] == [
            1,
            1,
            1,
        ]
    finally:
        s.close()


def _flood(url: str, tenant: str, n: int, max_tokens: int, ttft: list[float], threads: list[threading.Thread]):
    def one():
        t0 = time.monotonic()
        with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": "x", "max_tokens": max_tokens, "stream": True,
                                "user": tenant}) as r:  # fmt: skip
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    ttft.append(time.monotonic() - t0)
                    break
            for _ in lines:
                pass

    for _ in range(n):
        th = threading.Thread(target=one)
        th.start()
        threads.append(th)


@pytest.mark.served
@pytest.mark.timed
@pytest.mark.parametrize("policy", ["vtc", "fcfs"])
def test_a_light_tenant_is_not_starved_by_a_heavy_one_under_vtc(policy, request):
    s = Stack(engines=2, max_running=2, step_s=0.01, policy=policy)
    try:
        heavy, light, threads = [], [], []
        _flood(s.url, "heavy", 40, 20, heavy, threads)  # 40 x 20 tokens on 4 slots: about 2 s of backlog
        time.sleep(0.3)
        _flood(s.url, "light", 4, 20, light, threads)
        for th in threads:
            th.join(60)
        if policy == "vtc":
            assert max(light) < 1.0  # served next, alternating with the heavy tenant (measured: 0.5 s)
        else:
            assert min(light) > 1.2  # first come, first served: behind the whole backlog (about 1.7 s)
    finally:
        s.close()


@pytest.mark.served
def test_a_client_that_disconnects_is_closed_upstream_refunded_and_leaves_nothing_behind(stack):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True, "user": "quitter"}
    gw = stack.app.state.gateway
    with httpx.stream("POST", stack.url + "/v1/completions", timeout=60, json=body) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                got += 1
                if got == 1:  # read while the stream is surely open: leaving the loop may close it at once
                    while_running = gw.admission.policy.counter["quitter"]  # the prompt and 200 predicted tokens
                if got == 3:
                    break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (gw.admission.running or any(u.in_flight for u in gw.pool.upstreams)):
        time.sleep(0.05)
    assert not gw.admission.running and not gw.admission.waiting
    assert all(u.in_flight == 0 for u in gw.pool.upstreams)
    m = _metrics(stack.url)
    assert _sum(m, "fairness_gateway_requests_total", tenant="quitter", outcome="cancelled") == 1
    assert _sum(m, "fairness_gateway_running", tenant="quitter") == 0
    refunded = while_running - gw.admission.policy.counter["quitter"]
    received = _sum(m, "fairness_gateway_tokens_total", tenant="quitter", kind="completion")  # relayed before it left
    assert received >= 3 and refunded == 2 * (200 - received)  # charged the prompt and what reached it, not the rest
    # the upstream's slot was freed: a request needing both of one engine's slots gets through at once
    assert _client(stack.url).completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2


def _spawn_fake(port: int) -> subprocess.Popen:
    return spawn(["tests.fake_engine", "--max-running", "4", "--step-s", "0.01"], port)


def test_a_connection_its_peer_closes_as_it_opens_is_an_upstream_down():
    """httpcore over anyio can surface a peer killed while its socket opens as an AttributeError (seen when an
    upstream was SIGKILLed mid-run): the pool reports the upstream down, so the gateway requeues the request rather
    than answering a bare 500."""

    def dies(request: httpx.Request) -> httpx.Response:
        raise AttributeError("'NoneType' object has no attribute 'getpeername'")

    pool = UpstreamPool(["http://127.0.0.1:9"])
    pool.client = httpx.AsyncClient(transport=httpx.MockTransport(dies))

    async def relay() -> None:
        try:
            async for _ in pool.stream(pool.upstreams[0], "/v1/completions", {"stream": True}, {}):
                pass
        finally:
            await pool.aclose()

    with pytest.raises(UpstreamDown, match="closed the connection as it opened"):
        asyncio.run(relay())


@pytest.mark.served
def test_an_upstream_killed_mid_run_loses_no_request_and_rejoins_when_restarted():
    ports = [free_port() for _ in range(3)]
    procs: list[subprocess.Popen] = []  # every process started, killed at the end (restarts included)
    app = create_gateway([f"http://127.0.0.1:{p}" for p in ports], "vtc", limit=4, probe_s=0.2,
                         config=GatewayConfig(queue_timeout_s=30))  # fmt: skip
    gw_server = BackgroundServer(app)
    outcomes: list[str] = []
    try:
        procs += [_spawn_fake(p) for p in ports]
        url = gw_server.start()

        def one(i: int) -> None:
            try:
                r = httpx.post(url + "/v1/completions", timeout=60,
                               json={"model": MODEL, "prompt": "x", "max_tokens": 30, "user": f"t{i % 3}"})  # fmt: skip
                outcomes.append("ok" if r.status_code == 200 else f"error {r.status_code} {r.json()['error']['code']}")
            except httpx.HTTPError as e:
                outcomes.append(f"lost: {e!r}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(60)]
        for i, th in enumerate(threads):
            th.start()
            if i == 20:
                procs[0].send_signal(signal.SIGKILL)  # mid-run: it has requests in flight
            time.sleep(0.01)
        for th in threads:
            th.join(60)
        assert len(outcomes) == 60 and not [o for o in outcomes if o.startswith("lost")]
        errors = [o for o in outcomes if o != "ok"]
        assert all(o.startswith("error 502 upstream_error") for o in errors), errors  # only those in flight on it
        assert len(errors) <= 4  # at most its limit
        gw = app.state.gateway
        assert not gw.pool.upstreams[0].healthy
        procs.append(_spawn_fake(ports[0]))  # restarted on the same port
        deadline = time.monotonic() + 10
        while not gw.pool.upstreams[0].healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        before = gw.pool.upstreams[0].served
        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert gw.pool.upstreams[0].served > before  # it rejoined and takes work
        assert not gw.admission.running and not gw.admission.waiting
    finally:
        gw_server.stop()
        for p in procs:
            p.kill()
            p.wait()


# --- real engines -------------------------------------------------------------------------------------------------


@pytest.mark.served
@pytest.mark.slow
def test_in_front_of_fairness_serve_replicas_unpatched_and_offloaded(reference_dir):
    from fairness.serve import build_engine
    from fairness.serving.server import create_app

    engines = [build_engine(reference_dir, "vtc", device="cpu", max_running=4),
               build_engine(reference_dir, "vtc", device="cpu", max_running=4, offload_budget=0.5,
                            offload_options={"miss_path": "fetch", "prefetch": None})]  # fmt: skip
    servers = [BackgroundServer(create_app(e, max_tokens_limit=64)) for e in engines]
    urls = [s.start() for s in servers]
    gw = BackgroundServer(create_gateway(urls, "vtc", limit=2))
    url = gw.start()
    try:
        direct, through = _client(urls[0]), _client(url)
        prompts = ["import os\n", "def f(x):", "class A:", "for i in range(", "return self."]
        for p in prompts:  # greedy, and fetching experts is exact: every replica answers as the unpatched one
            want = direct.completions.create(model="reference-moe", prompt=p, max_tokens=12)
            got = through.completions.create(model="reference-moe", prompt=p, max_tokens=12, user="alice")
            assert got.choices[0].text == want.choices[0].text and got.usage == want.usage
        stream = list(through.completions.create(model="reference-moe", prompt=prompts[1], max_tokens=12, stream=True))
        assert "".join(c.choices[0].text for c in stream if c.choices) == direct.completions.create(
            model="reference-moe", prompt=prompts[1], max_tokens=12).choices[0].text  # fmt: skip
        assert engines[1].offload.stats().misses > 0  # some requests ran on the offloaded replica
        m = _metrics(url)
        assert _sum(m, "fairness_gateway_tokens_total", tenant="alice", kind="prompt") == sum(
            len(engines[0].encode_prompt(p)) for p in prompts
        )  # settled from usage, not the gateway's estimate
    finally:
        gw.stop()
        for s in servers:
            s.stop()


@pytest.mark.served
@pytest.mark.slow
def test_in_front_of_transformers_serve_with_continuous_batching(reference_dir):
    """A server this project did not write (transformers' own `transformers serve`). Its KV cache is given a size
    (64 blocks): sized from the memory it finds, the cache is large and slow to set up on the first request."""
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen([str(exe), "serve", "--continuous-batching", "--cb-num-blocks", "64", "--device", "cpu",
                             "--port", str(port), str(reference_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    upstream = f"http://127.0.0.1:{port}"
    model = str(reference_dir)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(upstream + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not start")
        gw = BackgroundServer(create_gateway([upstream], "vtc", limit=4))
        url = gw.start()
        try:
            through, direct = _client(url), _client(upstream)
            assert model in [m.id for m in through.models.list().data]
            want = direct.completions.create(model=model, prompt="import os\n", max_tokens=8)
            got = through.completions.create(model=model, prompt="import os\n", max_tokens=8, user="t1")
            assert got.choices[0].text == want.choices[0].text and got.usage.completion_tokens == 8
            chunks = list(through.completions.create(model=model, prompt="import os\n", max_tokens=8, stream=True))
            assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
            m = _metrics(url)
            assert _sum(m, "fairness_gateway_tokens_total", tenant="t1", kind="prompt") == want.usage.prompt_tokens
        finally:
            gw.stop()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.bench
@pytest.mark.served
@pytest.mark.slow
def test_a_soak_with_clients_leaving_early_leaves_nothing_behind():
    """20 s here (`python -m lab.gateway_soak --seconds 180` for the long one): two replicas, one offloaded."""
    from lab.gateway_soak import left_behind, soak

    report = soak(seconds=20, concurrency=8, leave=0.3)
    assert report["requests"]["left"] > 10 and report["requests"]["ok"] > 50 and report["requests"]["error"] == 0
    assert left_behind(report) == []
    assert all(e["kv_free"] == 1.0 for e in report["engines"])
