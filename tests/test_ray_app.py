"""fairness.gateway on Ray Serve: a local Ray instance, two offloaded engine replicas with their own budgets behind
the gateway as ingress, over real HTTP with the openai client; Serve and Ray shut down afterwards."""

import time

import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")

from fairness.gateway.ray_app import deploy  # noqa: E402
from tests.servers import free_port, redis_server  # noqa: E402

pytestmark = [pytest.mark.served, pytest.mark.slow, pytest.mark.alone]  # Ray beside other tests: 5x slower


def test_two_offloaded_replicas_behind_two_gateway_replicas_on_ray_serve(reference_dir):
    """Two gateway replicas (`--gateways 2`) sharing one redis-server, in front of two offloaded engines."""
    import redis
    from ray import serve

    store_port = free_port()
    store = redis_server(store_port)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        url = deploy(reference_dir, [0.5, 0.25], "vtc", max_running=2, max_tokens_limit=32, port=free_port(),
                     gateways=2, state=f"redis://127.0.0.1:{store_port}")  # fmt: skip
        # each gateway replica probes the engines every 0.5 s, 1 s allowed each: on a loaded machine the first
        # probes may time out, and the gateway reports the engines healthy once one passes
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            health = httpx.get(url + "/health", timeout=30).json()
            if all(u["healthy"] for u in health["upstreams"]):
                break
            time.sleep(0.5)
        assert [u["healthy"] for u in health["upstreams"]] == [True, True]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [reference_dir.name]
        answers = [client.completions.create(model=reference_dir.name, prompt="def f(x):", max_tokens=6,
                                             user=f"t{i % 2}") for i in range(6)]  # fmt: skip
        assert all(a.usage.completion_tokens == 6 for a in answers)
        store_client = redis.Redis(port=store_port)
        assert store_client.scard("fairness:gws") == 2  # both gateway replicas in the fleet
        assert float(store_client.hget("fairness:counters", "t0")) > 0  # charged in the shared counter
        with pytest.raises(ValueError, match="unknown scheduling policy"):
            deploy(reference_dir, [0.5], "nope")
        with pytest.raises(ValueError, match="--state"):
            deploy(reference_dir, [0.5], "vtc", gateways=2)
    finally:
        serve.shutdown()
        ray.shutdown()
        store.kill()
        store.wait()
