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
import json
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
    raise missing("serve", e) from e

from fairness.core.policy import SchedulingPolicy
from fairness.gateway.admission import Admission, NoUpstream, Ticket
from fairness.gateway.metrics import GatewayMetrics
from fairness.gateway.upstreams import UpstreamDown, UpstreamFailed, UpstreamPool
from fairness.serving.api import ApiError, Tenant, is_int, read_json, tenant_of_key, usage
from fairness.sim.workloads import estimate_tokens

FAIRNESS_ID_HEADER = "x-gateway-fairness-id"


@dataclass(frozen=True)
class GatewayConfig:
    """queue_timeout_s: longest wait for an upstream before 503. max_requeues: times a request that an upstream
    refused before its first token goes back to the queue. max_tokens_limit: the largest max_tokens (None: the
    upstreams decide)."""

    queue_timeout_s: float = 300.0
    max_requeues: int = 3
    max_tokens_limit: int | None = None


class ClientGone(Exception):
    """The client closed its connection."""


class Gateway:
    """One request's way through: checks, the queue, an upstream, the response; `admission` owns the queue."""

    def __init__(self, pool: UpstreamPool, policy: str | SchedulingPolicy | Callable[[], SchedulingPolicy],
                 tenants: dict[str, Tenant] | None, config: GatewayConfig):  # fmt: skip
        self.pool, self.tenants, self.config = pool, tenants, config
        self.metrics = GatewayMetrics(pool)
        self.admission = Admission(policy, pool, observers=[self.metrics])
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await asyncio.gather(*(self.pool.probe(u) for u in self.pool.upstreams))
        self._tasks = [asyncio.create_task(self.pool.probe_forever(self.admission.wake)),
                       asyncio.create_task(self.admission.run())]  # fmt: skip

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: one of GET /v1/models", "missing_model", "model")
        if not self.pool.known(model):
            if not any(u.models for u in self.pool.upstreams):
                raise ApiError(503, "no upstream has answered its probes yet", "no_upstream", type_="server_error")
            raise ApiError(404, f"the model {model!r} does not exist; the upstreams serve {self.pool.models()}",
                           "model_not_found", "model")  # fmt: skip
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        limit = self.config.max_tokens_limit
        if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1 or (limit and max_tokens > limit)):
            raise ApiError(400, f"max_tokens must be an integer in [1, {limit or 'the model context'}], got "
                           f"{max_tokens!r}", "invalid_value", "max_tokens")  # fmt: skip
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, "'stream' must be true or false", "invalid_value", "stream")
        if not isinstance(body.get("stream_options") or {}, dict):
            raise ApiError(400, "'stream_options' must be an object", "invalid_value", "stream_options")
        return model, max_tokens

    # --- one request ------------------------------------------------------------------------------------------------

    async def serve(self, request: Request, body: dict, tenant: Tenant, prompt_tokens: int, path: str) -> Response:
        model, max_tokens = self.check(body)
        chat = path.endswith("chat/completions")
        ticket = self.admission.arrive(tenant.name, tenant.weight, prompt_tokens, max_tokens, model)
        upstream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        events = self._relay(ticket, path, upstream_body, {FAIRNESS_ID_HEADER: tenant.name})
        try:
            if body.get("stream"):
                # the first event before the response starts: an error before any token keeps its HTTP status
                first = await _unless_gone(request, events.__anext__())
                wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return StreamingResponse(_sse(first, events, wants_usage), media_type="text/event-stream")
            return JSONResponse(_assemble(await _unless_gone(request, _collect(events)), chat, ticket))
        except ClientGone:
            await events.aclose()
            return Response(status_code=499)
        except StopAsyncIteration:  # the upstream ended without an event
            return _no_event().response()
        except ApiError:
            await events.aclose()
            raise

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
                sent, in_flight, started, final = False, up.in_flight, time.monotonic(), None
                try:
                    async for event in self.pool.stream(up, path, body, headers):
                        if not sent:
                            up.limit.observe(time.monotonic() - started, in_flight)
                            self.metrics.ttft.observe(time.monotonic() - ticket.info.arrival_s)
                            sent = True
                        self.admission.tokens(ticket, _tokens(event))
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
                        raise ApiError(502, f"upstream failed mid-response: {e}", "upstream_error",
                                       type_="server_error") from e  # fmt: skip
                    self.admission.finish(ticket, 0, 0)  # refused: nothing served, nothing charged
                    raise _passthrough(e) from e
            up.served += 1
            final = final or {}
            self.admission.finish(ticket, int(final.get("completion_tokens", ticket.generated)),
                                  int(final.get("prompt_tokens", ticket.info.input_tokens)))  # fmt: skip
            outcome = "ok"
        finally:
            self.admission.cancel(ticket)  # no-op once finished: charges what reached the client, refunds the rest
            self.metrics.requests.labels(ticket.info.client, outcome).inc()


def create_gateway(upstreams: list[str], policy: str | SchedulingPolicy | Callable[[], SchedulingPolicy] = "vtc",
                   tenants: dict[str, Tenant] | None = None, limit: int | None = None,
                   config: GatewayConfig | None = None, probe_s: float = 1.0, read_s: float = 120.0,
                   api_key: str | None = None) -> FastAPI:  # fmt: skip
    """The gateway's FastAPI application. limit: requests in flight per upstream (None: learned from each one's time
    to first token). api_key: sent to the upstreams as a bearer token."""
    gw = Gateway(UpstreamPool(upstreams, limit, probe_s, read_s=read_s, api_key=api_key), policy, tenants,
                 config or GatewayConfig())  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        yield
        await gw.stop()

    app = FastAPI(title="fairness.gateway", lifespan=lifespan)
    app.state.gateway = gw

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.get("/health")
    async def health() -> JSONResponse:
        ups = [{"url": u.url, "healthy": u.healthy, "in_flight": u.in_flight, "served": u.served,
                "limit": u.limit.value,
                "models": sorted(u.models)} for u in gw.pool.upstreams]  # fmt: skip
        ok = any(u.healthy for u in gw.pool.upstreams)
        return JSONResponse({"status": "ok" if ok else "unavailable", "upstreams": ups}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fairness.gateway"}
                                           for m in gw.pool.models()]}  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        gw.metrics.refresh()
        return PlainTextResponse(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request)
        tenant = gw.tenant(request, body)
        return await gw.serve(request, body, tenant, _prompt_tokens(body.get("prompt")), "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await read_json(request)
        tenant = gw.tenant(request, body)
        return await gw.serve(request, body, tenant, _chat_tokens(body.get("messages")), "/v1/chat/completions")

    return app


# --- helpers ----------------------------------------------------------------------------------------------------------


def _prompt_tokens(prompt: object) -> int:
    """The prompt's length in tokens: exact for token ids, estimated for text (1 per 4 characters, as the trace
    loaders do; settled from the upstream's usage)."""
    if isinstance(prompt, str) and prompt:
        return estimate_tokens(prompt)
    if isinstance(prompt, list) and prompt:
        if all(is_int(t) for t in prompt):
            return len(prompt)
        if all(isinstance(p, str) and p for p in prompt):
            return sum(estimate_tokens(p) for p in prompt)
        if all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt):
            return sum(len(p) for p in prompt)
    raise ApiError(400, "'prompt' is required: a non-empty string, list of strings or list of token ids",
                   "missing_prompt", "prompt")  # fmt: skip


def _chat_tokens(messages: object) -> int:
    """Estimated tokens of a chat: its text content plus a few tokens of template per message."""
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    ):
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content} objects", "missing_messages",
                       "messages")  # fmt: skip
    total = 0
    for m in messages:
        content = m.get("content")
        parts = [content] if isinstance(content, str) else [p.get("text") for p in content or [] if isinstance(p, dict)]
        total += 4 + sum(estimate_tokens(p) for p in parts if isinstance(p, str) and p)
    return total


def _tokens(event: dict) -> int:
    """Output tokens in one streamed event: one per choice that carries text (engines stream a token per event;
    `usage` settles the count at the end)."""
    n = 0
    for c in event.get("choices") or []:
        delta = c.get("delta") or {}
        if c.get("text") or delta.get("content") or delta.get("tool_calls"):
            n += 1
    return n


def _no_event() -> ApiError:
    return ApiError(502, "the upstream sent no event", "upstream_error", type_="server_error")


def _passthrough(e: UpstreamFailed) -> ApiError:
    """The upstream's own error, as it sent it (a 5xx becomes 502: the gateway's upstream failed)."""
    err = (e.body or {}).get("error") if isinstance(e.body, dict) else None
    err = err if isinstance(err, dict) else {}
    status = e.status if e.status is not None and 400 <= e.status < 500 else 502
    message = err.get("message") or str(e)
    return ApiError(status, str(message), err.get("code"), err.get("param"), str(err.get("type") or "upstream_error"))


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


async def _sse(first: dict, events: AsyncIterator[dict], wants_usage: bool) -> AsyncIterator[str]:
    """Server-sent events to the client; an upstream that fails mid-stream ends it with an error event."""

    def out(event: dict) -> str | None:
        if not wants_usage and "usage" in event:
            event = {k: v for k, v in event.items() if k != "usage"}
            if not event.get("choices"):
                return None
        return f"data: {json.dumps(event)}\n\n"

    try:
        for event in [first]:
            if (line := out(event)) is not None:
                yield line
        async for event in events:
            if (line := out(event)) is not None:
                yield line
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        await events.aclose()  # also when the client left: the upstream request is closed, the rest refunded
    yield "data: [DONE]\n\n"


def _assemble(events: list[dict], chat: bool, ticket: Ticket) -> dict:
    """The non-streamed response an OpenAI client expects, from the upstream's streamed events."""
    if not events:
        raise _no_event()
    head, choices, final = events[0], {}, None
    for event in events:
        final = event.get("usage") or final
        for c in event.get("choices") or []:
            i = c.get("index", 0)
            acc = choices.setdefault(i, {"index": i, "text": [], "finish_reason": None, "role": "assistant",
                                         "tool_calls": {}})  # fmt: skip
            delta = c.get("delta") or {}
            acc["text"].append(c.get("text") or delta.get("content") or "")
            acc["role"] = delta.get("role") or acc["role"]
            for call in delta.get("tool_calls") or []:
                merged = acc["tool_calls"].setdefault(call.get("index", 0), {"function": {"arguments": ""}})
                merged.update({k: v for k, v in call.items() if k not in ("function", "index")})
                fn = call.get("function") or {}
                merged["function"]["name"] = fn.get("name") or merged["function"].get("name")
                merged["function"]["arguments"] += fn.get("arguments") or ""
            acc["finish_reason"] = c.get("finish_reason") or acc["finish_reason"]
    out = []
    for i in sorted(choices):
        acc = choices[i]
        text = "".join(acc["text"])
        if chat:
            message = {"role": acc["role"], "content": text}
            if acc["tool_calls"]:
                message["tool_calls"] = [acc["tool_calls"][k] for k in sorted(acc["tool_calls"])]
            out.append({"index": i, "message": message, "finish_reason": acc["finish_reason"]})
        else:
            out.append({"index": i, "text": text, "finish_reason": acc["finish_reason"], "logprobs": None})
    final = final or usage(ticket.info.input_tokens, ticket.generated)
    return {"id": head.get("id"), "object": "chat.completion" if chat else "text_completion",
            "created": head.get("created", int(time.time())), "model": head.get("model"), "choices": out,
            "usage": final}  # fmt: skip
