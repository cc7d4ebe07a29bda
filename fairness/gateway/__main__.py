"""`python -m fairness.gateway --upstream URL [--upstream URL ...] --policy vtc [--tenants FILE] --port 8000`."""

from __future__ import annotations

import argparse

from fairness.extras import missing

try:
    import uvicorn
except ImportError as e:
    raise missing("gateway", e) from e

from fairness.core.driver import OracleUnavailableError
from fairness.core.policy import policy_names
from fairness.gateway.app import GatewayConfig, create_gateway
from fairness.serving.api import load_tenants


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m fairness.gateway", description="A fair, OpenAI-compatible gateway in front of LLM engines."
    )
    ap.add_argument(
        "--upstream",
        action="append",
        required=True,
        metavar="URL",
        help="an OpenAI-compatible engine's base URL (repeat for each replica)",
    )
    ap.add_argument("--policy", default="vtc", help=f"scheduling policy, one of {policy_names()}")
    ap.add_argument(
        "--tenants", help='JSON: {"<api key>": {"name": "<tenant>", "weight": 1.0}}; keys are then required'
    )
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        help="requests in flight per upstream (default: learned from its time to first token)",
    )
    ap.add_argument("--queue-timeout", type=float, default=300.0, help="seconds a request may wait before 503")
    ap.add_argument("--upstream-timeout", type=float, default=120.0, help="seconds an upstream may stay silent")
    ap.add_argument("--upstream-api-key", default=None, help="bearer token the gateway sends to its upstreams")
    ap.add_argument("--max-tokens-limit", type=int, default=None, help="the largest max_tokens a request may ask for")
    ap.add_argument(
        "--tenant-idle-s", type=float, default=600.0, help="seconds after which an idle tenant's state is dropped"
    )
    ap.add_argument(
        "--charge",
        choices=["all", "uncached"],
        default="all",
        help="prompt tokens charged: all, or less those the upstream's prefix cache served",
    )
    ap.add_argument("--max-tenants", type=int, default=10_000, help="tenants known at once; past it, 429")
    ap.add_argument(
        "--state",
        default=None,
        metavar="redis://HOST:PORT",
        help="a Redis or Valkey store shared by every gateway of a fleet (VTC's counters, the fleet's backlog and "
        "in-flight counts); needs pip install 'offload-moe[fleet]'",
    )
    ap.add_argument(
        "--tenant-xargs",
        action="store_true",
        help="name each request's tenant to the upstreams in vllm_xargs, for vLLM running fairness.vllm.FairScheduler",
    )
    ap.add_argument("--gateway-id", default=None, help="this gateway's name in the shared store (default: random)")
    ap.add_argument("--probe-interval", type=float, default=1.0, help="seconds between probes of a down upstream")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    if args.policy not in policy_names():
        raise SystemExit(f"unknown policy {args.policy!r}; registered: {policy_names()}")
    try:
        tenants = load_tenants(args.tenants) if args.tenants else None
        config = GatewayConfig(
            queue_timeout_s=args.queue_timeout,
            max_tokens_limit=args.max_tokens_limit,
            tenant_idle_s=args.tenant_idle_s,
            max_tenants=args.max_tenants,
            charge=args.charge,
            state=args.state,
            gateway_id=args.gateway_id,
            tenant_xargs=args.tenant_xargs,
        )
        app = create_gateway(
            args.upstream,
            args.policy,
            tenants,
            args.limit,
            config,
            args.probe_interval,
            args.upstream_timeout,
            args.upstream_api_key,
        )
    except (ValueError, OracleUnavailableError, ImportError) as e:
        raise SystemExit(str(e)) from e
    print(
        f"fairness.gateway under {args.policy} on http://{args.host}:{args.port}/v1 -> {', '.join(args.upstream)}",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
