"""The gateway's HTTP layer (FastAPI): OpenAI-compatible completions and chat completions, streamed or not, in front
of any OpenAI-compatible engines, with `/v1/models`, `/health` and Prometheus `/metrics`.

A request is checked (the same OpenAI-style 4xx as `fairness.serve`, before any upstream is touched), queued for its
tenant, admitted in the policy's order, and always streamed from its upstream (so output tokens are charged as they
arrive and time to first token is measured); a client that did not ask to stream gets the assembled response.
Tenant: the API key's (with a tenants file: 401 otherwise), else the `x-gateway-fairness-id` header (llm-d's
convention), else the body's `user`, else "anonymous".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fairness.extras import missing

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
except ImportError as e:
    raise missing("gateway", e) from e

from fairness.core.policy import SchedulingPolicy
from fairness.gateway.admission import Admission, NoUpstream, Ticket, TooManyTenants
from fairness.gateway.metrics import GatewayMetrics
from fairness.gateway.openai_events import (
    assemble,
    chat_tokens,
    event_tokens,
    no_event_error,
    prompt_tokens,
    sse,
    upstream_error,
)
from fairness.gateway.upstreams import UpstreamDown, UpstreamFailed, UpstreamPool
from fairness.serving.api import ApiError, Tenant, common_params, openai_app, read_json, tenant_of_key

CHARGES = ("all", "uncached")
FAIRNESS_ID_HEADER = "x-gateway-fairness-id"


@dataclass(frozen=True)
class GatewayConfig:
    """queue_timeout_s: longest wait for an upstream before 503. max_requeues: times a request that an upstream
    refused before its first token goes back to the queue. max_tokens_limit: the largest max_tokens (None: the
    upstreams decide). tenant_idle_s, max_tenants: the bound on per-tenant state (`Admission`): without a tenants
    file any client names its own tenant, so a client rotating names must not grow counters, queues and metric
    series without bound; 600 s outlives a pause between requests, and 10,000 tenants cost a few MB. charge: which
    prompt tokens a tenant is charged, "all" (default: VTC's service, what the paper measures, and a cached token
    still holds KV memory while its request runs) or "uncached" (less what the upstream's prefix cache served, as
    its `usage.prompt_tokens_details.cached_tokens` reports: Dynamo's rule, which rewards tenants whose prompts
    share prefixes). state: a Redis or Valkey URL whose store the gateways of one fleet share (`gateway.fleet`:
    VTC's counters, what each gateway has waiting and each upstream has in flight); None: this gateway alone.
    gateway_id: this gateway's name in the store (default: a random one). tenant_xargs: name each request's tenant
    to the upstream in `vllm_xargs` ({"tenant": ...}), where vLLM's fairness plug-in (`fairness.vllm`) reads it."""

    queue_timeout_s: float = 300.0
    max_requeues: int = 3
    max_tokens_limit: int | None = None
    tenant_idle_s: float = 600.0
    max_tenants: int = 10_000
    charge: str = "all"
    state: str | None = None
    gateway_id: str | None = None
    tenant_xargs: bool = False

    def __post_init__(self) -> None:
        if self.charge not in CHARGES:
            raise ValueError(f"unknown charge {self.charge!r}; choose one of {list(CHARGES)}")


class ClientGone(Exception):
    """The client closed its connection."""


class Gateway:
    """One request's way through: checks, the queue, an upstream, the response; `admission` owns the queue."""

    def __init__(
        self,
        pool: UpstreamPool,
        policy: str | SchedulingPolicy | Callable[[], SchedulingPolicy],
        tenants: dict[str, Tenant] | None,
        config: GatewayConfig,
    ):
        self.pool, self.tenants, self.config = pool, tenants, config
        self.metrics = GatewayMetrics(pool)
        bounds = {"tenant_idle_s": config.tenant_idle_s, "max_tenants": config.max_tenants}
        if config.state is None:
            self.admission = Admission(policy, pool, observers=[self.metrics], **bounds)
        else:
            from fairness.gateway.fleet import FleetAdmission
            from fairness.gateway.store import SharedState

            state = SharedState(config.state, config.gateway_id)
            self.admission = FleetAdmission(state, policy, pool, observers=[self.metrics], **bounds)
            self.metrics.watch_state(self.admission)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await asyncio.gather(*(self.pool.probe(u) for u in self.pool.upstreams))
        self._tasks = [
            asyncio.create_task(self.pool.probe_forever(self.admission.wake)),
            asyncio.create_task(self.admission.run()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.admission.aclose()
        await self.pool.aclose()

    # --- checks -----------------------------------------------------------------------------------------------------

    def tenant(self, request: Request, body: dict) -> Tenant:
        if self.tenants is not None:
            return tenant_of_key(request, self.tenants)
        header = request.headers.get(FAIRNESS_ID_HEADER, "").strip()
        if header:
            return Tenant(header)
        user = body.get("user")
        return Tenant(user) if isinstance(user, str) and user else Tenant("anonymous")

    def check(self, body: dict) -> tuple[str, int | None]:
        """(model, max_tokens) of a well-formed request; ApiError otherwise."""
        common = common_params(body, self.config.max_tokens_limit)
        model = common.model
        if not self.pool.known(model):
            if not any(u.models for u in self.pool.upstreams):
                raise ApiError(503, "no upstream has answered its probes yet", "no_upstream", type_="server_error")
            raise ApiError(
                404,
                f"the model {model!r} does not exist; the upstreams serve {self.pool.models()}",
                "model_not_found",
                "model",
            )
        return model, common.max_tokens

    # --- one request ------------------------------------------------------------------------------------------------

    async def serve(self, request: Request, body: dict, tenant: Tenant, prompt_tokens: int, path: str) -> Response:
        model, max_tokens = self.check(body)
        chat = path.endswith("chat/completions")
        try:
            ticket = self.admission.arrive(tenant.name, tenant.weight, prompt_tokens, max_tokens, model)
        except TooManyTenants as e:
            raise ApiError(429, str(e), "too_many_tenants", type_="rate_limit_error") from e
        upstream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        if self.config.tenant_xargs:
            upstream_body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), "tenant": tenant.name}
        events = self._relay(ticket, path, upstream_body, {FAIRNESS_ID_HEADER: tenant.name})
        try:
            if body.get("stream"):
                # the first event before the response starts: an error before any token keeps its HTTP status
                first = await _unless_gone(request, events.__anext__())
                wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return StreamingResponse(sse(first, events, wants_usage), media_type="text/event-stream")
            return JSONResponse(assemble(await _unless_gone(request, _collect(events)), chat, ticket))
        except ClientGone:
            await events.aclose()
            return Response(status_code=499)
        except StopAsyncIteration:  # the upstream ended without an event
            return no_event_error().response()
        except ApiError:
            await events.aclose()
            raise

    def _charged_prompt(self, usage: dict, ticket: Ticket) -> int:
        """The prompt tokens the tenant is charged, from the upstream's usage (`charge`)."""
        prompt = int(usage.get("prompt_tokens", ticket.info.input_tokens))
        if self.config.charge == "uncached":
            details = usage.get("prompt_tokens_details") or {}
            prompt -= min(prompt, int(details.get("cached_tokens") or 0))
        return prompt

    async def _relay(self, ticket: Ticket, path: str, body: dict, headers: dict[str, str]) -> AsyncIterator[dict]:
        """The upstream's events for `ticket`, charging the policy as they come; ApiError when it cannot be served."""
        outcome = "cancelled"
        try:
            while True:
                try:
                    up = await self.admission.admitted(ticket, self.config.queue_timeout_s)
                except NoUpstream as e:
                    outcome = "no_upstream"
                    raise ApiError(503, str(e), "no_upstream", type_="server_error") from e
                sent, final = False, None
                try:
                    async for event in self.pool.stream(up, path, body, headers):
                        if not sent:
                            self.metrics.ttft.observe(time.monotonic() - ticket.info.arrival_s)
                            sent = True
                        n = event_tokens(event)
                        self.admission.tokens(ticket, n)
                        saturated = up.in_flight >= up.limit.value and bool(self.admission.waiting)
                        up.limit.tokens(n, time.monotonic(), saturated)
                        final = event.get("usage") or final
                        yield event
                    break
                except UpstreamDown as e:
                    self.pool.down(up)
                    self.metrics.failures.labels(up.url).inc()
                    if sent or ticket.requeues >= self.config.max_requeues:
                        outcome = "upstream_error"
                        raise ApiError(502, f"upstream failed: {e}", "upstream_error", type_="server_error") from e
                    self.admission.requeue(ticket)  # another upstream, or this one when it is back
                except UpstreamFailed as e:
                    outcome = "upstream_error"
                    if e.status is None:  # broke off: no new work until its probes pass
                        self.pool.down(up)
                        self.metrics.failures.labels(up.url).inc()
                        raise ApiError(
                            502, f"upstream failed mid-response: {e}", "upstream_error", type_="server_error"
                        ) from e
                    self.admission.finish(ticket, 0, 0)  # refused: nothing served, nothing charged
                    raise upstream_error(e) from e
            up.served += 1
            final = final or {}
            self.admission.finish(
                ticket, int(final.get("completion_tokens", ticket.generated)), self._charged_prompt(final, ticket)
            )
            outcome = "ok"
        finally:
            self.admission.cancel(ticket)  # no-op once finished: charges what reached the client, refunds the rest
            self.metrics.requests.labels(ticket.info.client, outcome).inc()


def create_gateway(
    upstreams: list[str],
    policy: str | SchedulingPolicy | Callable[[], SchedulingPolicy] = "vtc",
    tenants: dict[str, Tenant] | None = None,
    limit: int | None = None,
    config: GatewayConfig | None = None,
    probe_s: float = 1.0,
    read_s: float = 120.0,
    api_key: str | None = None,
) -> FastAPI:
    """The gateway's FastAPI application. limit: requests in flight per upstream (None: learned from each one's time
    to first token). api_key: sent to the upstreams as a bearer token."""
    gw = Gateway(
        UpstreamPool(upstreams, limit, probe_s, read_s=read_s, api_key=api_key),
        policy,
        tenants,
        config or GatewayConfig(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        yield
        await gw.stop()

    app = openai_app("fairness.gateway", lifespan)
    app.state.gateway = gw

    @app.get("/health")
    async def health() -> JSONResponse:
        ups = [
            {
                "url": u.url,
                "healthy": u.healthy,
                "in_flight": u.in_flight,
                "served": u.served,
                "limit": u.limit.value,
                "models": sorted(u.models),
            }
            for u in gw.pool.upstreams
        ]
        ok = any(u.healthy for u in gw.pool.upstreams)
        return JSONResponse({"status": "ok" if ok else "unavailable", "upstreams": ups}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fairness.gateway"} for m in gw.pool.models()
            ],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        gw.metrics.refresh()
        return PlainTextResponse(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request)
        tenant = gw.tenant(request, body)
        return await gw.serve(request, body, tenant, prompt_tokens(body.get("prompt")), "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await read_json(request)
        tenant = gw.tenant(request, body)
        return await gw.serve(request, body, tenant, chat_tokens(body.get("messages")), "/v1/chat/completions")

    return app


async def _unless_gone(request: Request, work: Awaitable):
    """`work`'s result, unless the client disconnects first (then ClientGone, and `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await task
            raise ClientGone


async def _collect(events: AsyncIterator[dict]) -> list[dict]:
    return [e async for e in events]
