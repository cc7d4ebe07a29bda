"""The Grafana dashboard reads only metrics that the gateway and the server really export."""

import json
import re
from pathlib import Path

from fairness.gateway.metrics import GatewayMetrics
from fairness.gateway.upstreams import UpstreamPool

DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana" / "fairness-dashboard.json"
SERVER_METRICS = {"fairness_client_service_total", "fairness_requests_queued", "fairness_requests_running",
                  "fairness_ttft_seconds_bucket", "fairness_tokens_per_second"}  # fmt: skip
OFFLOAD_METRICS = {"offload_moe:expert_hit_rate", "offload_moe:expert_misses_total", "offload_moe:host_experts_total",
                   "offload_moe:bytes_copied_total", "offload_moe:stall_seconds_total",
                   "offload_moe:layer_expert_misses_total"}  # fmt: skip


def _exported(registry) -> set[str]:
    return {s.name for fam in registry.collect() for s in fam.samples} | {fam.name for fam in registry.collect()}


def test_every_dashboard_query_names_an_exported_metric(reference_dir):
    from fairness.serve import build_engine

    pool = UpstreamPool(["http://127.0.0.1:1"], limit=1)
    gateway = GatewayMetrics(pool)
    gateway.refresh()
    gateway.tokens.labels("t", "prompt").inc()
    gateway.requests.labels("t", "ok").inc()
    gateway.waiting.labels("t").set(0)
    gateway.running.labels("t").set(0)
    gateway.failures.labels(pool.upstreams[0].url).inc()
    engine = build_engine(reference_dir, "vtc", device="cpu", max_running=1, offload_budget=0.5)
    engine.metrics.service.labels("t").inc()  # labelled metrics export samples once a label is seen
    engine.metrics.ttft.labels("t").observe(0.1)
    exported = _exported(gateway.registry) | _exported(engine.metrics.registry)
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b((?:fairness_|offload_moe:)[a-z_]+)\b", e)}
    assert names and names <= exported, names - exported
    assert SERVER_METRICS | OFFLOAD_METRICS <= names
