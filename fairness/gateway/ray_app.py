"""The gateway on Ray Serve: N `fairness.serve` engine replicas (the model offloaded, each with its own budget), each
its own Serve application at `/engine-<i>`, and `fairness.gateway` as the ingress at `/`, with one policy counter
for all of them. One command starts it on a local or existing Ray cluster:

    pip install 'offload-moe[ray]'
    python -m fairness.gateway.ray_app examples/reference-moe --replicas 2 --offload-budget 0.5 --policy vtc

Why the gateway as ingress, not a Ray Serve custom request router: a router chooses a replica for each request as it
arrives, in arrival order; fairness needs the order itself (whom to admit next from per-tenant queues while every
replica is busy), so the queue must sit in front of the replicas, in one place. With `--gateways N --state
redis://HOST:PORT` the ingress has N replicas sharing one counter in a Redis or Valkey store (`gateway.fleet`), the
same store a fleet of gateway processes shares outside Ray. Why a store and not a Ray actor: the store is what the
fleet outside Ray already uses and tests (its scripts make each admission one atomic round trip), it survives the
Ray cluster, and an actor would be a second implementation of the same state with the same single-owner failure
mode.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fairness.extras import missing

try:
    import ray
    from ray import serve
except ImportError as e:
    raise missing("ray", e) from e

from fairness.core.policy import make_policy
from fairness.gateway.app import GatewayConfig, create_gateway


@serve.ingress()
class EngineReplica:
    """One `fairness.serve` engine (FCFS inside: the gateway orders the requests it sends)."""

    def __init__(self, model: str, budget: float | None, max_running: int, max_tokens_limit: int):
        from fairness.serve import build_engine

        self.engine = build_engine(model, "fcfs", device=None, offload_budget=budget, max_running=max_running)
        self.max_tokens_limit = max_tokens_limit

    def __serve_build_asgi_app__(self):
        from fairness.serving.server import create_app

        return create_app(self.engine, max_tokens_limit=self.max_tokens_limit)


@serve.ingress()
class GatewayIngress:
    """`fairness.gateway` in front of the engines' routes on Serve's HTTP proxy."""

    def __init__(self, upstreams: list[str], policy: str, limit: int, state: str | None = None):
        config = GatewayConfig(state=state)  # each replica its own name in the store
        self.gateway = create_gateway(upstreams, policy, limit=limit, probe_s=0.5, config=config)

    def __serve_build_asgi_app__(self):
        return self.gateway


def deploy(
    model: str | Path,
    budgets: list[float | None],
    policy: str = "vtc",
    max_running: int = 8,
    max_tokens_limit: int = 512,
    port: int = 8000,
    cpus_per_engine: float = 1.0,
    gateways: int = 1,
    state: str | None = None,
) -> str:
    """Start Serve's proxy on `port` (Ray must be initialised), deploy one engine application per budget and the
    gateway at `/` (`gateways` replicas of it, sharing the store at `state`); returns the gateway's base URL."""
    make_policy(policy)  # an unknown name fails here, before anything is deployed
    if not budgets:
        raise ValueError("deploy needs at least one engine (one budget per replica)")
    if gateways > 1 and state is None:
        raise ValueError(
            f"{gateways} gateway replicas need one shared store for their counters: --state redis://HOST:PORT "
            "(with independent counters each replica would be fair only among the requests Serve sends it)"
        )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    engine = serve.deployment(EngineReplica, ray_actor_options={"num_cpus": cpus_per_engine})
    gateway = serve.deployment(GatewayIngress, num_replicas=gateways, ray_actor_options={"num_cpus": 0})
    urls = [f"{base}/engine-{i}" for i in range(len(budgets))]
    # every application at once: the engines load their models side by side, and the gateway reports an engine
    # unhealthy (and sends it nothing) until its probe passes
    engines = [
        serve.RunTarget(engine.bind(str(model), b, max_running, max_tokens_limit), f"engine-{i}", f"/engine-{i}")
        for i, b in enumerate(budgets)
    ]
    serve.run_many([*engines, serve.RunTarget(gateway.bind(urls, policy, max_running, state), "gateway", "/")])
    return base


def _budget(text: str) -> float | None:
    return None if text == "none" else float(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m fairness.gateway.ray_app",
        description="fairness.gateway in front of engine replicas on Ray Serve.",
    )
    ap.add_argument("model", type=Path, help="a model directory (safetensors checkpoint)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument(
        "--offload-budget",
        type=_budget,
        action="append",
        default=None,
        help="each replica's expert budget, a fraction (repeat once per replica, or give one for all; "
        "'none': unpatched)",
    )
    ap.add_argument("--policy", default="vtc")
    ap.add_argument(
        "--max-running", type=int, default=8, help="requests each engine runs at once (the gateway's limit)"
    )
    ap.add_argument("--gateways", type=int, default=1, help="gateway replicas (more than one needs --state)")
    ap.add_argument("--state", default=None, help="the gateways' shared store, redis://HOST:PORT (Redis or Valkey)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    args = ap.parse_args(argv)
    budgets = args.offload_budget or [None]
    if len(budgets) == 1:
        budgets = budgets * args.replicas
    if len(budgets) != args.replicas or args.replicas < 1:
        raise SystemExit(f"give one --offload-budget for all replicas or one per replica ({args.replicas})")
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a model directory (no config.json)")
    ray.init(address=args.address)
    try:
        url = deploy(args.model.resolve(), budgets, args.policy, args.max_running, port=args.port,
                     gateways=args.gateways, state=args.state)  # fmt: skip
    except ValueError as e:
        raise SystemExit(str(e)) from e
    print(f"fairness.gateway on Ray Serve: {url}/v1 -> {len(budgets)} engines, budgets {budgets}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
