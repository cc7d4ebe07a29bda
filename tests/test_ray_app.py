"""fairness.gateway on Ray Serve: a local Ray instance, two offloaded engine replicas with their own budgets behind
the gateway as ingress, over real HTTP with the openai client; Serve and Ray shut down afterwards."""

import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")

from fairness.gateway.ray_app import deploy  # noqa: E402
from lab.gateway_bench import free_port  # noqa: E402

pytestmark = [pytest.mark.served, pytest.mark.slow]


def test_two_offloaded_replicas_behind_the_gateway_on_ray_serve(reference_dir):
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        url = deploy(reference_dir, [0.5, 0.25], "vtc", max_running=2, max_tokens_limit=32, port=free_port())
        health = httpx.get(url + "/health", timeout=30).json()
        assert [u["healthy"] for u in health["upstreams"]] == [True, True]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [reference_dir.name]
        answers = [client.completions.create(model=reference_dir.name, prompt="def f(x):", max_tokens=6,
                                             user=f"t{i % 2}") for i in range(6)]  # fmt: skip
        assert all(a.usage.completion_tokens == 6 for a in answers)
        served = [u["served"] for u in httpx.get(url + "/health", timeout=30).json()["upstreams"]]
        assert all(n > 0 for n in served)  # the gateway used both replicas
        with pytest.raises(ValueError, match="unknown scheduling policy"):
            deploy(reference_dir, [0.5], "nope")
    finally:
        serve.shutdown()
        ray.shutdown()
