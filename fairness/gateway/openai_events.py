"""The OpenAI wire format at the gateway: prompt and chat token estimates (for queueing before an upstream counts
them), output tokens per streamed event, server-sent events to the client, and the non-streamed response assembled
from an upstream's events."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fairness.core.request import estimate_tokens
from fairness.gateway.admission import Ticket
from fairness.gateway.upstreams import UpstreamFailed
from fairness.serving.api import ApiError, is_int, usage


def prompt_tokens(prompt: object) -> int:
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
    raise ApiError(
        400,
        "'prompt' is required: a non-empty string, list of strings or list of token ids",
        "missing_prompt",
        "prompt",
    )


def chat_tokens(messages: object) -> int:
    """Estimated tokens of a chat: its text content plus a few tokens of template per message."""
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    ):
        raise ApiError(
            400, "'messages' is required: a non-empty list of {role, content} objects", "missing_messages", "messages"
        )
    total = 0
    for m in messages:
        content = m.get("content")
        parts = [content] if isinstance(content, str) else [p.get("text") for p in content or [] if isinstance(p, dict)]
        total += 4 + sum(estimate_tokens(p) for p in parts if isinstance(p, str) and p)
    return total


def event_tokens(event: dict) -> int:
    """Output tokens in one streamed event: one per choice that carries text (engines stream a token per event;
    `usage` settles the count at the end)."""
    n = 0
    for c in event.get("choices") or []:
        delta = c.get("delta") or {}
        if c.get("text") or delta.get("content") or delta.get("tool_calls"):
            n += 1
    return n


def no_event_error() -> ApiError:
    return ApiError(502, "the upstream sent no event", "upstream_error", type_="server_error")


def upstream_error(e: UpstreamFailed) -> ApiError:
    """The upstream's own error, as it sent it (a 5xx becomes 502: the gateway's upstream failed)."""
    err = (e.body or {}).get("error") if isinstance(e.body, dict) else None
    err = err if isinstance(err, dict) else {}
    status = e.status if e.status is not None and 400 <= e.status < 500 else 502
    message = err.get("message") or str(e)
    return ApiError(status, str(message), err.get("code"), err.get("param"), str(err.get("type") or "upstream_error"))


async def sse(first: dict, events: AsyncIterator[dict], wants_usage: bool) -> AsyncIterator[str]:
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


def assemble(events: list[dict], chat: bool, ticket: Ticket) -> dict:
    """The non-streamed response an OpenAI client expects, from the upstream's streamed events."""
    if not events:
        raise no_event_error()
    head, choices, final = events[0], {}, None
    for event in events:
        final = event.get("usage") or final
        for c in event.get("choices") or []:
            i = c.get("index", 0)
            acc = choices.setdefault(
                i, {"index": i, "text": [], "finish_reason": None, "role": "assistant", "tool_calls": {}}
            )
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
    return {
        "id": head.get("id"),
        "object": "chat.completion" if chat else "text_completion",
        "created": head.get("created", int(time.time())),
        "model": head.get("model"),
        "choices": out,
        "usage": final,
    }
