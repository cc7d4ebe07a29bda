"""The OpenAI-compatible HTTP layer of `fairness.serve` (FastAPI): completions and chat completions (streamed as
server-sent events or not), models, health and Prometheus metrics. Bad input gets an OpenAI-style error body and a
4xx status; the server keeps serving.

The client a request is charged to: the API key's tenant when a tenants file is given (then a missing or unknown
key is refused with 401), else the request's `user` field, else "anonymous".
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fairness.extras import missing

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
except ImportError as e:
    raise missing("serve", e) from e

from fairness.serving.api import (
    ApiError,
    Tenant,
    common_params,
    is_int,
    is_message,
    model_list,
    openai_app,
    read_json,
    tenant_of_key,
    usage,
)
from fairness.serving.cb_scheduler import Client
from fairness.serving.engine import ServingEngine, Stream


def create_app(
    engine: ServingEngine, tenants: dict[str, Tenant] | None = None, max_tokens_limit: int = 512, drain_s: float = 30.0
) -> FastAPI:
    """The FastAPI application serving `engine`; it starts the engine on startup and drains it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop(drain_s)

    app = openai_app("fairness.serve", lifespan)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.healthy
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return model_list([engine.model_name], "fairness.serve")

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        client, body = _client(request, tenants), await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
            if not all(0 <= t < engine.vocab_size for t in prompt):
                raise ApiError(400, f"token ids must be in [0, {engine.vocab_size})", "invalid_value", "prompt")
            ids = list(prompt)  # token ids, as the OpenAI API allows
        elif isinstance(prompt, str) and prompt:
            ids = engine.encode_prompt(prompt)
        else:
            raise ApiError(
                400, "'prompt' is required: a non-empty string or list of token ids", "missing_prompt", "prompt"
            )
        return await _serve(engine, body, client, ids, "text_completion", max_tokens_limit)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        client, body = _client(request, tenants), await read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(is_message(m) for m in messages):
            raise ApiError(
                400,
                "'messages' is required: a non-empty list of {role, content} objects with string content",
                "missing_messages",
                "messages",
            )
        return await _serve(engine, body, client, engine.encode_chat(messages), "chat.completion", max_tokens_limit)

    return app


def _client(request: Request, tenants: dict[str, Tenant] | None) -> Client:
    """The tenant of the request's API key (tenants given), else None: the body's `user` decides (see _serve)."""
    if tenants is None:
        return Client(arrival=time.monotonic())
    tenant = tenant_of_key(request, tenants)
    return Client(tenant.name, tenant.weight, time.monotonic())


def _check(engine: ServingEngine, body: dict, prompt_len: int, limit: int) -> int:
    """Validate the common parameters; returns max_tokens."""
    common = common_params(body, limit)
    model = common.model
    if model != engine.model_name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {engine.model_name!r}",
            "model_not_found",
            "model",
        )
    if not engine.accepting:
        raise ApiError(503, "the server is shutting down", "unavailable", type_="server_error")
    max_tokens = 16 if common.max_tokens is None else common.max_tokens
    if prompt_len + max_tokens > engine.context_length:
        raise ApiError(
            400,
            f"this model's maximum context length is {engine.context_length} tokens; the request "
            f"needs {prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to complete)",
            "context_length_exceeded",
            "messages" if "messages" in body else "prompt",
        )
    temperature, top_p, n = body.get("temperature"), body.get("top_p"), body.get("n", 1)
    if temperature not in (None, 0, 0.0) or top_p not in (None, 1, 1.0) or n != 1:
        raise ApiError(
            400,
            "this server decodes greedily, one choice per request: leave temperature and top_p "
            "unset (or 0 and 1) and n at 1",
            "unsupported_parameter",
        )
    return max_tokens


async def _serve(engine: ServingEngine, body: dict, client: Client, ids: list[int], kind: str, limit: int) -> Response:
    max_tokens = _check(engine, body, len(ids), limit)
    if client.name == "anonymous" and isinstance(body.get("user"), str) and body["user"]:
        client = Client(body["user"], client.weight, client.arrival)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", "invalid_value", "stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", "invalid_value", "ignore_eos")
    response_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    stream = engine.submit(ids, client, max_tokens, ignore_eos)
    if body.get("stream"):  # checked by common_params
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _sse(engine, stream, stop, response_id, kind, len(ids), include_usage), media_type="text/event-stream"
        )
    try:
        parts = [part async for part in _text(engine, stream, stop)]
    finally:
        stream.close()
    text = "".join(delta for delta, _, _ in parts)
    _, reason, generated = parts[-1] if parts else ("", None, 0)
    if reason == "error":
        raise ApiError(500, "generation failed", "generation_error", type_="server_error")
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        if kind == "chat.completion"
        else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    )
    return JSONResponse(
        {
            "id": response_id,
            "object": kind,
            "created": int(time.time()),
            "model": engine.model_name,
            "choices": [choice],
            "usage": usage(len(ids), generated),
        }
    )


async def _text(engine: ServingEngine, stream: Stream, stop: list[str]):
    """(new text, finish reason or None, tokens generated) as tokens arrive; cuts at a stop string (which ends the
    request) and holds back an incomplete UTF-8 character."""
    sent = ""
    async for update in stream:
        text = engine.decode(update.tokens)
        hit = min((text.find(s) for s in stop if s in text), default=-1)
        if hit >= 0:
            yield text[len(sent) : hit], "stop", len(update.tokens)
            return
        if not update.finished:
            text = text.rstrip("\ufffd")
        yield text[len(sent) :], update.finish_reason, len(update.tokens)
        sent = text
        if update.finished:
            return


async def _sse(
    engine: ServingEngine,
    stream: Stream,
    stop: list[str],
    response_id: str,
    kind: str,
    prompt_len: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    created, total, first = int(time.time()), 0, True
    model = engine.model_name

    def event(choice: dict) -> str:
        data = {"id": response_id, "object": chunk_kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    try:
        async for delta, reason, generated in _text(engine, stream, stop):
            total = generated
            if kind == "chat.completion":
                content = {"role": "assistant", "content": delta} if first else {"content": delta}
                yield event({"index": 0, "delta": content, "finish_reason": reason})
            else:
                yield event({"index": 0, "text": delta, "finish_reason": reason, "logprobs": None})
            first = False
    finally:
        stream.close()  # synchronous: also runs when the client went away and this task is cancelled
    if include_usage:
        data = {
            "id": response_id,
            "object": chunk_kind,
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(prompt_len, total),
        }
        yield f"data: {json.dumps(data)}\n\n"
    yield "data: [DONE]\n\n"
